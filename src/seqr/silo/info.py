"""`seqr info LIBRARY_DIR`: what a library holds: adapters, layers, rank, shared A, sizes, stats and each adapter's
differential-privacy guarantee (seqr.core.privacy), or none."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from seqr.store.library import LoraLibrary
from seqr.core.argfmt import Parser
from seqr.core.privacy import Guarantee, guarantees, unguaranteed


def describe(lib: LoraLibrary, path: Path) -> dict:
    """A JSON-able summary; per adapter the spread of its per-layer mu and sigma, its token count (the example
    count under DP) and its DP guarantee (None: none)."""
    disk = sum((path / f).stat().st_size for f in lib.files())  # its own files, not what else the dir holds
    adapters = []
    for name, g in guarantees(lib).items():
        st = lib.stats(name)
        row = {"name": name, "calibrated": st is not None, "privacy": None if g is None else g.to_dict()}
        if st:
            mus, sigmas = [s.mean for s in st.values()], [s.std for s in st.values()]
            count = next(iter(st.values())).count
            row.update(mu_mean=statistics.fmean(mus), mu_min=min(mus), mu_max=max(mus),
                       sigma_mean=statistics.fmean(sigmas), tokens=None if g else count, examples=count if g else None)
        adapters.append(row)
    return {"path": str(path), "base_model": lib.meta.base_model, "adapters": len(lib), "layers": len(lib.layers),
            "rank": lib.rank, "shared_a": lib.shared_a, "a_seed": lib.meta.a_seed,
            "target_modules": lib.meta.target_modules, "storage_dtype": lib.storage_dtype, "disk_bytes": disk,
            "adapter_stats": adapters, "without_privacy_guarantee": unguaranteed(lib)}


def format_info(d: dict) -> str:
    lines = [f"library {d['path']}: {d['adapters']} adapters x {d['layers']} layers, rank {d['rank']}, "
             f"{'shared A (seed ' + str(d['a_seed']) + ')' if d['shared_a'] else 'one A per adapter'}, "
             f"base model {d['base_model']!r}, targets {', '.join(d['target_modules'])}, "
             f"{d['disk_bytes'] / 2**20:.1f} MiB on disk ({d['storage_dtype']})", "",
             "| adapter | calibrated | mean mu | min mu | max mu | mean sigma | tokens | privacy |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for a in d["adapter_stats"]:
        g = a["privacy"]
        shown = "none" if g is None else Guarantee.from_dict(g).describe()
        if a["calibrated"]:
            count = a["tokens"] if g is None else f"{a['examples']} examples"
            lines.append(f"| {a['name']} | yes | {a['mu_mean']:.4g} | {a['mu_min']:.4g} | {a['mu_max']:.4g} "
                         f"| {a['sigma_mean']:.4g} | {count} | {shown} |")
        else:
            lines.append(f"| {a['name']} | no | | | | | | {shown} |")
    missing = d["without_privacy_guarantee"]
    lines += ["", f"without a privacy guarantee: {', '.join(missing) if missing else 'none'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="seqr info", description="Describe a seqr library.")
    p.add_argument("library")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--verify", action="store_true",
                   help="read every adapter file and verify its checksum and values (default: their headers only)")
    a = p.parse_args(argv)
    try:
        lib = LoraLibrary.load(a.library, lazy=not a.verify)
    except (ValueError, FileNotFoundError) as e:
        print(f"seqr info: {e}", file=sys.stderr)
        return 2
    d = describe(lib, Path(a.library))
    print(json.dumps(d, indent=1) if a.json else format_info(d))
    return 0
