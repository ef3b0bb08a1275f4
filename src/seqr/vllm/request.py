"""Request-level routing in vLLM (`seqr serve --engine vllm`, granularity `request-vote`, the default, or `request`).

Each request is routed once, before vLLM sees it: a transformers copy of the model with the library attached runs
the probe of the request-level granularity over the prompts (`seqr.hf.layers.request_choices`: each prompt token's
calibrated scores summed over the routed layers, then its tokens' votes ("request-vote") or the sum over its tokens
("request"), among the request's allowed adapters; the prompts that arrive together in one batch) and picks one
adapter per request. vLLM then serves the whole request with that adapter,
in one of two ways (`REQUEST_PATHS`):
- "seqr" (the default): seqr's routed model with the request's set narrowed to that one adapter, so every token
  takes it without scoring (the fixed-adapter path, in the compute dtype, as the transformers path applies it);
- "vllm-lora": vLLM's own per-request LoRA (its punica kernels) on the plain model; no seqr code runs inside vLLM.
  Adapters are exported as peft dirs named by their content: a re-added or changed adapter gets a new vLLM LoRA
  name and id, so vLLM never serves stale weights under an old id.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path

import torch

from seqr.hf.granularity import DEFAULT
from seqr.store.digest import weights_digest
from seqr.store.library import LoraLibrary

REQUEST_PATHS = ("seqr", "vllm-lora")  # how vLLM serves a request's chosen adapter
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
    """The probe model (transformers, float32) with the library attached, and (`export`) the library's adapters as
    peft dirs for vLLM: `choose_many(prompts, allowed)` -> adapter names, `lora(name)` -> (vLLM LoRA name, int id,
    dir)."""

    def __init__(self, model_dir: str | Path, library: LoraLibrary, work_dir: str | Path, *, method: str,
                 probe_depth: float = 1.0, export: bool = True, granularity: str = DEFAULT):
        from seqr.hf.models import load_model

        self.model, _ = load_model(str(model_dir), dtype="float32")
        self.method, self.probe_depth, self.granularity = method, probe_depth, granularity
        self.root = Path(work_dir) / "seqr_adapters"
        self._ids = itertools.count(1)
        self._loras: dict[str, tuple[str, int, str]] = {}  # name -> (lora name, id, dir) of the current weights
        self._by_digest: dict[str, tuple[str, int, str]] = {}
        self._lock = threading.Lock()
        self.export = export
        self.sync(library)

    def sync(self, library: LoraLibrary) -> None:
        """Route over `library` from now on: re-attach the probe model, export new or changed adapters (`export`)."""
        from seqr.hf.layers import STATE_ATTR, attach, detach

        with self._lock:
            if hasattr(self.model, STATE_ATTR):
                detach(self.model)
            attach(self.model, library, method=self.method, granularity=self.granularity,
                   probe_depth=self.probe_depth)
            loras = {}
            for name in library.names if self.export else ():
                d = weights_digest(library, name)
                key = f"{name}-{d}"
                if key not in self._by_digest:
                    path = library.to_peft(name, self.root / key)
                    self._by_digest[key] = (key, next(self._ids), str(path))
                loras[name] = self._by_digest[key]
            self._loras = loras

    def choose(self, prompt: list[int], allowed) -> str:
        return self.choose_many([prompt], [allowed])[0]

    @torch.no_grad()
    def choose_many(self, prompts: list[list[int]], allowed: list) -> list[str]:
        """Each prompt's adapter among its own allowed set, from one probe forward over all of them (left-padded)."""
        from seqr.hf.layers import request_choices

        L = max(map(len, prompts))
        ids = torch.zeros(len(prompts), L, dtype=torch.long)  # (B, L) left-padded
        mask = torch.zeros(len(prompts), L, dtype=torch.long)  # (B, L) 1 on real tokens
        for b, p in enumerate(prompts):
            ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p, dtype=torch.long), 1
        padded = not bool(mask.all())  # positions as each prompt's own: counted from its first real token
        with self._lock:
            return request_choices(self.model, ids, mask if padded else None, allowed=[set(a) for a in allowed],
                                   method=self.method, probe_depth=self.probe_depth, granularity=self.granularity,
                                   position_ids=(mask.cumsum(-1) - 1).clamp_min(0) if padded else None)

    def lora(self, name: str) -> tuple[str, int, str]:
        with self._lock:
            return self._loras[name]
