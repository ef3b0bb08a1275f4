"""Real peft adapters on a tiny random Llama, for library / inference tests (seeded, written to disk)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def make_adapter(path: Path, *, seed: int, a_seed: int | None = 0, r: int = 4, alpha: float = 8,
                 rslora: bool = False, targets=TARGETS, base_seed: int = 0, base_name: str | None = "tiny-llama"):
    """Train-free peft adapter: lora_A from `a_seed` (shared when equal) or from `seed`; random non-zero B."""
    model = get_peft_model(tiny_llama(base_seed), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                              use_rslora=rslora, init_lora_weights=False))
    g_a = torch.Generator().manual_seed(seed if a_seed is None else 1000 + a_seed)
    g_b = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in sorted(model.named_modules()):
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                A.copy_(torch.randn(A.shape, generator=g_a) / r)
                B.copy_(torch.randn(B.shape, generator=g_b) * 0.3)
    model.save_pretrained(path)
    if base_name is not None:
        cfg_path = Path(path) / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg))
    return model.eval()
