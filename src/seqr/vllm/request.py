"""Request-level routing on vLLM's own per-request LoRA path (`seqr serve --engine vllm --granularity request`).

Each request is routed once, before vLLM sees it: a transformers copy of the model with the library attached runs
the probe of granularity "request" over the prompt (`seqr.hf.layers.request_choices`: the prompt's calibrated scores
summed over its tokens and the routed layers, among the request's allowed adapters) and picks one adapter; vLLM then
serves the whole request with that adapter as a standard LoRA (its own punica kernels) on the plain model. No seqr
code runs inside vLLM and nothing is routed per generated token.

Adapters are exported as peft dirs named by their content: a re-added or changed adapter gets a new vLLM LoRA
name and id, so vLLM never serves stale weights under an old id.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path

import torch

from seqr.store.digest import weights_digest
from seqr.store.library import LoraLibrary

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts


def lora_rank_bound(rank: int) -> int:
    """The smallest max_lora_rank vLLM takes that holds `rank`."""
    fit = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fit:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; the library's rank is {rank}")
    return fit[0]


def request_engine_kwargs(model_dir: str | Path, rank: int, *, dtype: str, max_batch: int, max_model_len: int,
                          max_loras: int) -> dict:
    """The `vllm.LLM` arguments of the plain model with vLLM's own LoRA support (no vLLM import)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"the vLLM engine needs a local model dir with a config.json, got {model_dir}")
    return dict(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_batch,
                enforce_eager=True, enable_lora=True, max_loras=max_loras, max_lora_rank=lora_rank_bound(rank))


class RequestRouter:
    """The probe model (transformers, float32) with the library attached, and the library's adapters as peft dirs
    for vLLM: `choose(prompt, allowed)` -> adapter name, `lora(name)` -> (vLLM LoRA name, int id, dir)."""

    def __init__(self, model_dir: str | Path, library: LoraLibrary, work_dir: str | Path, *, method: str,
                 probe_depth: float = 1.0):
        from seqr.hf.models import load_model

        self.model, _ = load_model(str(model_dir), dtype="float32")
        self.method, self.probe_depth = method, probe_depth
        self.root = Path(work_dir) / "seqr_adapters"
        self._ids = itertools.count(1)
        self._loras: dict[str, tuple[str, int, str]] = {}  # name -> (lora name, id, dir) of the current weights
        self._by_digest: dict[str, tuple[str, int, str]] = {}
        self._lock = threading.Lock()
        self.sync(library)

    def sync(self, library: LoraLibrary) -> None:
        """Route over `library` from now on: re-attach the probe model, export new or changed adapters."""
        from seqr.hf.layers import STATE_ATTR, attach, detach

        with self._lock:
            if hasattr(self.model, STATE_ATTR):
                detach(self.model)
            attach(self.model, library, method=self.method, granularity="request", probe_depth=self.probe_depth)
            loras = {}
            for name in library.names:
                d = weights_digest(library, name)
                key = f"{name}-{d}"
                if key not in self._by_digest:
                    path = library.to_peft(name, self.root / key)
                    self._by_digest[key] = (key, next(self._ids), str(path))
                loras[name] = self._by_digest[key]
            self._loras = loras

    @torch.no_grad()
    def choose(self, prompt: list[int], allowed) -> str:
        from seqr.hf.layers import request_choices

        with self._lock:
            ids = torch.tensor([prompt])  # (1, T)
            return request_choices(self.model, ids, allowed=[set(allowed)], method=self.method,
                                   probe_depth=self.probe_depth)[0]

    def lora(self, name: str) -> tuple[str, int, str]:
        with self._lock:
            return self._loras[name]
