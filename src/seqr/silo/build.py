"""`seqr build ADAPTER_DIR... -o LIBRARY_DIR`: silos' adapter dirs (peft + stats) into one library."""
from __future__ import annotations

import sys

from seqr.store.library import STORAGE_DTYPES, LoraLibrary
from seqr.core.argfmt import Parser


def build(adapter_dirs: list[str], out: str, *, allow_uncalibrated: bool = False,
          dtype: str = "float32") -> LoraLibrary:
    """Read every adapter (checking they fit together) and save the library with its tensors stored in `dtype`;
    uncalibrated adapters are refused unless allowed, since SEQR's z-scores need each silo's mu and sigma."""
    lib = LoraLibrary.from_peft(adapter_dirs)
    if lib.uncalibrated and not allow_uncalibrated:
        raise ValueError(f"adapter(s) without calibration stats: {lib.uncalibrated}; run `seqr calibrate` on "
                         f"them, or pass --allow-uncalibrated to route on raw norms")
    lib.save(out, dtype=dtype)
    return lib


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="seqr build", description="Build a routing library from adapter dirs.")
    p.add_argument("adapters", nargs="+", help="adapter directories (peft adapter + seqr_stats.json)")
    p.add_argument("-o", "--out", required=True, help="library directory to write")
    p.add_argument("--allow-uncalibrated", action="store_true", help="accept adapters without stats")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float32",
                   help="dtype of the stored tensors: float16 / bfloat16 halve the files; loading gives float32 "
                        "back and routing math stays float32 (default float32)")
    a = p.parse_args(argv)
    try:
        lib = build(a.adapters, a.out, allow_uncalibrated=a.allow_uncalibrated, dtype=a.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"seqr build: {e}", file=sys.stderr)
        return 2
    print(f"wrote {lib!r} to {a.out}")
    return 0
