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
                 rslora: bool = False, targets=TARGETS, base_seed: int = 0, base_name: str | None = "tiny-llama",
                 dominant: float = 1.0, b_scale: float = 0.3, base=None):
    """Train-free peft adapter: lora_A from `a_seed` (shared when equal) or from `seed`; random non-zero B.
    `dominant` > 1 scales B's first column so B A has a clearly dominant singular value (for peft's Arrow,
    whose 15 power-iteration steps need one); `base` builds another base model (default: the tiny Llama)."""
    base = tiny_llama(base_seed) if base is None else base
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                                            init_lora_weights=False, fan_in_fan_out=_is_gpt2(base)))
    g_a = torch.Generator().manual_seed(seed if a_seed is None else 1000 + a_seed)
    g_b = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in sorted(model.named_modules()):
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                A.copy_(torch.randn(A.shape, generator=g_a) / r)
                B.copy_(torch.randn(B.shape, generator=g_b) * b_scale)
                B[:, 0] *= dominant
    model.save_pretrained(path)
    if base_name is not None:
        cfg_path = Path(path) / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg))
    return model.eval()


def _is_gpt2(model) -> bool:
    return getattr(model.config, "model_type", "") == "gpt2"


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def adapter_library(root: Path, names, *, base=None, **adapter_kw):
    """A library of peft adapters `names` (adapter i seeded i, shared A unless a_seed=None), each written under
    root/<name>; `base()` builds each adapter's base model (default: the tiny Llama)."""
    from seqr import LoraLibrary

    for i, name in enumerate(names):
        make_adapter(Path(root) / name, seed=i, base=None if base is None else base(), **adapter_kw)
    return LoraLibrary.from_peft({n: Path(root) / n for n in names})


def random_stats(lib, *, seed: int = 0, n: int = 30):
    """Calibrate every adapter of `lib` with seeded stand-in norms (n values in [1, 2) per layer); returns lib."""
    from seqr import NormStats

    g = torch.Generator().manual_seed(seed)
    for name in lib.names:
        lib.set_stats(name, {layer: NormStats().update(torch.rand(n, generator=g) + 1) for layer in lib.layers})
    return lib
