"""Tiny random Llama and Qwen2 models that vLLM's CPU attention takes (head_dim 64), and a calibrated seqr library
on one."""
from __future__ import annotations

from pathlib import Path

import torch


# family -> transformers config and model class (Qwen2: biased q/k/v)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
SIZES = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)


def tiny_vllm_model(family: str, vocab_size: int, seed: int = 0, init: float = 0.2):
    """A tiny random model of one of FAMILIES, sized for vLLM's CPU attention."""
    import transformers

    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(vocab_size=vocab_size, initializer_range=init, **SIZES)
    return getattr(transformers, model_cls)(cfg).eval()


def model_and_library(root: Path, names, *, b_scale: float = 0.3, boost: dict | None = None, family: str = "llama"):
    """root/model (a tiny `family` model + chat tokenizer) and root/lib (a shared-A library of peft adapters `names`,
    calibrated on random norms; `boost` scales chosen adapters' B so they win routing). Adapter dirs: root/a."""
    from peft_factory import make_adapter
    from tiny_chat import chat_tokenizer

    from seqr import LoraLibrary, NormStats
    from seqr.store.files import STATS_FILE, atomic_write_json
    from seqr.store.peft_io import stats_json

    tok = chat_tokenizer()
    tiny_vllm_model(family, len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    boost = boost or {}
    dirs = {}
    for i, n in enumerate(names):
        make_adapter(root / "a" / n, seed=i, base=tiny_vllm_model(family, len(tok)), b_scale=b_scale * boost.get(n, 1.0))
        dirs[n] = root / "a" / n
    lib = LoraLibrary.from_peft(dirs)
    g = torch.Generator().manual_seed(0)
    for n in lib.names:  # in the library and beside each adapter (so an admin can add the dir while serving)
        stats = {layer: NormStats().update(torch.rand(30, generator=g) + 1) for layer in lib.layers}
        lib.set_stats(n, stats)
        atomic_write_json(dirs[n] / STATS_FILE, stats_json(stats))
    lib.save(root / "lib")
    return root / "model", root / "lib"
