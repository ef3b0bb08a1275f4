"""Allowed sets as vLLM LoRA requests (no vLLM import here).

vLLM maps every token of a batch to its request's LoRA; seqr rides on that mapping to tell each layer which
adapters a token may use. A *set adapter* is a rank-1 peft LoRA on the model's probe layer (1 -> C) with
A = [[1]] and B = the set's mask over the library's C columns, so the probe's output on a 1 is exactly the mask
(0/1 are exact in any float dtype). Columns are assigned once per adapter name and never reused while serving:
a request in flight across a library change keeps its meaning, and a removed adapter's bit is simply unread.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch

from seqr.store.files import PEFT_CONFIG, PEFT_WEIGHTS, atomic_write_bytes, atomic_write_json, tensors_to_bytes

PROBE = "seqr_set_probe"  # the probe layer's module name in seqr's vLLM model
SETS_DIR = "seqr_sets"  # under the engine's work dir: one set adapter dir per allowed set


class Columns:
    """Adapter name -> set-mask column, for one serving process; a name keeps its column until the end."""

    def __init__(self, names, capacity: int):
        names = sorted(names)
        if capacity < len(names):
            raise ValueError(f"set-mask capacity {capacity} is below the library's {len(names)} adapters")
        self.capacity = capacity
        self.order: list[str | None] = names + [None] * (capacity - len(names))  # column c -> name
        self.col = {n: c for c, n in enumerate(names)}
        self.used = len(names)  # columns handed out so far (never reused)

    def sync(self, names) -> list[str | None]:
        """Give new names a fresh column and free the columns of names gone; returns the column order."""
        names = set(names)
        for n in sorted(names - set(self.col)):
            if self.used >= self.capacity:
                raise ValueError(f"no set-mask column left for adapter {n!r}: {self.capacity} columns were handed "
                                 f"out while serving; restart the server or raise --set-capacity")
            self.col[n], self.order[self.used] = self.used, n
            self.used += 1
        for n in set(self.col) - names:
            self.order[self.col.pop(n)] = None
        return list(self.order)

    def mask(self, allowed) -> torch.Tensor:
        """(C,) 0/1 float: the set's columns."""
        unknown = sorted(a for a in allowed if a not in self.col)
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; the library holds {sorted(self.col)}")
        m = torch.zeros(self.capacity)
        m[[self.col[a] for a in allowed]] = 1.0
        return m


class SetAdapters:
    """Writes (once) and names the set adapter of each allowed set: (lora name, lora int id, dir)."""

    def __init__(self, root: str | Path, columns: Columns):
        self.root, self.columns = Path(root) / SETS_DIR, columns
        self._ids: dict[tuple, tuple[str, int, str]] = {}
        self._lock = threading.Lock()

    def get(self, allowed) -> tuple[str, int, str]:
        """The set adapter of `allowed` under the current columns (written on first use)."""
        mask = self.columns.mask(allowed)  # (C,)
        key = tuple(mask.nonzero()[:, 0].tolist())
        with self._lock:
            if key not in self._ids:
                digest = hashlib.sha256(json.dumps([self.columns.capacity, key]).encode()).hexdigest()[:16]
                path = self.root / f"set-{digest}"
                write_set_adapter(path, mask)
                self._ids[key] = (f"seqr-set-{digest}", len(self._ids) + 1, str(path))
            return self._ids[key]


def write_set_adapter(path: Path, mask: torch.Tensor) -> None:
    """A peft LoRA dir on the probe: rank 1, alpha 1 (scaling 1), A = [[1]], B = mask (C, 1)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{PROBE}.lora_A.weight": torch.ones(1, 1),
               f"base_model.model.{PROBE}.lora_B.weight": mask.reshape(-1, 1).clone()}
    atomic_write_bytes(path / PEFT_WEIGHTS, tensors_to_bytes(tensors))
    atomic_write_json(path / PEFT_CONFIG, {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [PROBE],
                                           "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                                           "task_type": "CAUSAL_LM", "fan_in_fan_out": False})


def read_set_mask(path: str | Path) -> torch.Tensor:
    """(C,) the mask a set adapter dir carries (its B), as `write_set_adapter` wrote it."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / PEFT_WEIGHTS))[f"base_model.model.{PROBE}.lora_B.weight"][:, 0]


def library_banks(library_dir: str, method: str):
    """(library, {layer: AdapterBank}) loaded from disk and prepared for `method`."""
    from seqr.store.library import LoraLibrary

    lib = LoraLibrary.load(library_dir)
    banks = {layer: lib.bank(layer).prepare(method) for layer in lib.layers}
    return lib, banks
