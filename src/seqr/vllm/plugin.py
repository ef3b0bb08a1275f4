"""vLLM's entry point into seqr (`vllm.general_plugins`): registers seqr's model architecture out of tree.

vLLM calls `register()` in every one of its processes; the model class is named lazily ("module:Class"), so
nothing of seqr's vLLM code is imported until vLLM builds the model.
"""
from __future__ import annotations

# vLLM causal-LM class -> the vLLM module defining it: each gets a routed counterpart from one factory
# (seqr.vllm.model.routed_class); a family whose layers vLLM packs as Llama's do needs only its line here
FAMILIES = {"LlamaForCausalLM": "vllm.model_executor.models.llama",
            "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2"}
ROUTED_ARCHITECTURES = {arch: f"Seqr{arch}" for arch in FAMILIES}  # base architecture -> its routed counterpart


def register() -> None:
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for routed in ROUTED_ARCHITECTURES.values():
        if routed not in supported:
            ModelRegistry.register_model(routed, f"seqr.vllm.model:{routed}")
