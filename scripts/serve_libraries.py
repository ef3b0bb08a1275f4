"""Random shared-A libraries on the real model for `seqr bench serve` (N adapters each, rank 8, calibrated with
random stats), with their peft dirs kept for vLLM's own LoRA serving (--peft-root).

    .venv/bin/python scripts/serve_libraries.py runs/serve 10 100
"""
import sys
from pathlib import Path

from seqr.bench.model import load_base, seqr_library, write_adapters


def main(out: str, *sizes: str) -> None:
    base, _ = load_base("smollm2-135m-instruct", quick=False, seed=0)
    for N in map(int, sizes):
        root = Path(out) / f"n{N}"
        if (root / "lib" / "manifest.json").exists():
            print(f"{root}: kept")
            continue
        (root / "peft").mkdir(parents=True, exist_ok=True)
        dirs = write_adapters(base, root / "peft", N, 8, seed=N)
        seqr_library(dirs, seed=N).save(root / "lib")
        print(f"{root}: {N} adapters")


if __name__ == "__main__":
    main(*sys.argv[1:])
