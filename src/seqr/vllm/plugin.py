"""vLLM's entry point into seqr (`vllm.general_plugins`): registers seqr's model architecture out of tree.

vLLM calls `register()` in every one of its processes; the model class is named lazily ("module:Class"), so
nothing of seqr's vLLM code is imported until vLLM builds the model.
"""
from __future__ import annotations

ARCHITECTURE = "SeqrLlamaForCausalLM"
ROUTED_ARCHITECTURES = {"LlamaForCausalLM": ARCHITECTURE}  # base architecture -> its seqr-routed counterpart


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "seqr.vllm.model:SeqrLlamaForCausalLM")
