"""The vLLM serving engine: `seqr serve --engine vllm`, the same interface as the embedded `Engine`.

vLLM's engine runs on one loop thread here: requests are added to it as they arrive and every `step()` runs
one continuously batched forward over all live requests (paged KV cache), each token routed per layer among its
own request's adapters (seqr/vllm/model.py). A request's allowed set travels in its sampling parameters, as
columns (seqr/vllm/sets.py); vLLM's LoRA support stays off. Library changes run on the loop thread once the
requests in flight have finished (new ones wait behind the change): the library is changed on disk, then every
vLLM worker reloads it (`collective_rpc("seqr_reload")`); every request is generated with one library, whole.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import queue
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

from seqr.hf.generation import Request, Result
from seqr.hf.granularity import REQUEST_PROBED, VLLM_SERVED, default_for
from seqr.serve.engine import Engine, Manifests, still_allowed
from seqr.vllm.plugin import ROUTED_ARCHITECTURES
from seqr.vllm.request import REQUEST_PATHS, RequestRouter, request_engine_kwargs
from seqr.vllm.sets import SET_KEY, Columns
from seqr.core.trace import Trace
from seqr.store.library import LoraLibrary

SET_CAPACITY = 256  # set-mask columns: adapters that may be added over one server's life


def engine_kwargs(model_dir: str | Path, library_dir: str | Path, columns: list, *, method: str, k: int | None,
                  dtype: str, max_batch: int, max_model_len: int, compile_cache: str | Path | None = None) -> dict:
    """The `vllm.LLM` arguments that serve `model_dir` routed over the library (no vLLM import). With
    `compile_cache`, vLLM's default compilation (each routed layer's update one opaque op in the graph) cached in
    that dir: vLLM's own cache key leaves out `hf_overrides`, so it could not tell two libraries apart; else
    eager."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"the vLLM engine needs a local model dir with a config.json, got {model_dir}")
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    routed = [ROUTED_ARCHITECTURES[a] for a in archs if a in ROUTED_ARCHITECTURES]
    if not routed:
        raise ValueError(f"the vLLM engine routes {sorted(ROUTED_ARCHITECTURES)} models; {model_dir} is {archs}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return dict(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_batch,
                enforce_eager=compile_cache is None,
                compilation_config={"mode": 0} if compile_cache is None else {"cache_dir": str(compile_cache)},
                hf_overrides={"architectures": routed[:1], "seqr_library": str(library_dir), "seqr_columns": columns,
                              "seqr_method": method, "seqr_k": k},
                worker_extension_cls="seqr.vllm.model.SeqrWorkerExtension")


class VllmEngine:
    """granularity "request-vote" (seqr's default) or "request": one adapter per request chosen by a probe of its
    prompt
    (seqr/vllm/request.py), served by seqr's routed model with the request's set narrowed to it
    (`request_path="seqr"`) or by vLLM's own per-request LoRA on the plain model ("vllm-lora"); "token" (the
    paper's, the other routers' default): seqr's routed model inside vLLM, every token routed per layer among its
    request's adapters. `compile` (vLLM's default): vLLM compiles the model once, each routed layer's update one
    opaque op in its graph (seqr/vllm/routing.py); False runs it eager."""

    def __init__(self, model_dir: str | Path, library: LoraLibrary, *, method: str | None = None, k: int | None = None,
                 dtype: str = "auto", max_batch: int = 8, max_model_len: int = 2048, max_sets: int | None = None,
                 work_dir: str | Path | None = None, set_capacity: int = SET_CAPACITY, granularity: str | None = None,
                 probe_depth: float = 1.0, request_path: str = "seqr", compile: bool = True, **llm_kwargs):
        from vllm import LLM

        if library.path is None:
            raise ValueError("the vLLM engine serves a library saved on disk (its workers load it); save it first")
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.library, self.method, self.k = library, method or library.default_method, k
        granularity = default_for(self.method) if granularity is None else granularity
        if granularity not in VLLM_SERVED:
            raise ValueError(f"the vLLM engine routes per token or per request ({VLLM_SERVED}), got granularity "
                             f"{granularity!r}")
        if request_path not in REQUEST_PATHS:
            raise ValueError(f"request_path must be one of {REQUEST_PATHS}, got {request_path!r}")
        self.columns = Columns(library.names, max(set_capacity, len(library)))
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="seqr-vllm-"))
        self.router, self.lora = None, granularity in REQUEST_PROBED and request_path == "vllm-lora"
        self.manifests = Manifests(self.method, {"granularity": granularity})
        if granularity in REQUEST_PROBED:
            self.router = RequestRouter(model_dir, library, self.work_dir, method=self.method, probe_depth=probe_depth,
                                        export=self.lora, granularity=granularity)
        if self.lora:
            kw = request_engine_kwargs(model_dir, library.rank, dtype=dtype, max_batch=max_batch,
                                       max_model_len=max_model_len, max_loras=max_sets or max_batch)
        else:
            kw = engine_kwargs(model_dir, library.path, self.columns.order, method=self.method, k=k, dtype=dtype,
                               max_batch=max_batch, max_model_len=max_model_len,
                               compile_cache=self._compile_cache(library) if compile else None)
        before = {c.pid for c in _children()}
        self.llm = LLM(**{**kw, **llm_kwargs})
        self._procs = [c for c in _children() if c.pid not in before]  # vLLM's engine core and workers: this engine's
        if not self.lora:  # the workers follow vLLM's batch: each token's request and set (per token: its shares)
            self.llm.collective_rpc("seqr_batch", args=(self.router is None,))
        self.tokenizer = self.llm.get_tokenizer()
        self._names = frozenset(library.names)
        self._q: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._live: dict[str, tuple] = {}  # id -> (request, future, tokens, (shares, manifest at its start))
        self._closed = False
        self._state = 0  # library changes applied by this engine (part of every request's cache salt)
        self._wake = threading.Event()  # a job was queued or the engine core sent a step's outputs
        self._ready = self._wake_on_outputs()
        self._thread = threading.Thread(target=self._run, name="seqr-vllm-engine", daemon=True)
        self._thread.start()

    def _compile_cache(self, library: LoraLibrary) -> Path:
        """vLLM's compile cache for this model over a library adapting these layers (the graph holds nothing else
        of the library: seqr/vllm/routing.py), in the engine's work dir."""
        layers = hashlib.sha256(json.dumps(sorted(library.layers)).encode()).hexdigest()[:16]
        return self.work_dir / "compile-cache" / layers

    @property
    def adapters(self) -> frozenset[str]:
        return self._names

    # ------------------------------------------------------------------------------------------ interface
    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        self._put(("generate", request, fut))
        return fut

    def call(self, fn) -> Future:
        """Run fn(engine) on the loop thread, between two steps."""
        fut: Future = Future()
        self._put(("call", fn, fut))
        return fut

    def _put(self, job: tuple) -> None:
        self._q.put(job)
        self._wake.set()

    def change(self, fn):
        """fn(library) (it changes the library on disk), then every worker reloads it; returns fn's result."""
        try:
            return fn(self.library)
        finally:
            self._names = frozenset(self.library.names)
            self.manifests.clear()
            self._state += 1  # a new cache salt: no prefix computed before the change is reused after it
            if self.router is not None:
                self.router.sync(self.library)
            if not self.lora:
                cols = self.columns.sync(self.library.names)
                self.llm.collective_rpc("seqr_reload", args=(str(self.library.path), cols))

    def reload(self, library: LoraLibrary) -> None:
        self.change(lambda _: setattr(self, "library", library))

    def trace(self, on: bool | None = None, reset: bool = True) -> Trace:
        """The workers' traced routing decisions, in the transformers path's format (a light `core.trace.Trace`
        whose rows are the allowed sets seen); call on the loop thread: `engine.call(lambda e: e.trace())`."""
        if self.router is not None:
            raise ValueError("granularity 'request' routes before vLLM: each Result's routing names its adapter")
        return Trace.from_state(self.llm.collective_rpc("seqr_trace", args=(on, reset))[0])

    def close(self) -> None:
        """Stop the loop (requests still live get an error) and vLLM's engine processes; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._put(("stop", None, Future()))
        self._thread.join(timeout=60)
        import psutil  # a vLLM dependency

        mine = {c.pid: c for c in self._procs + [d for c in self._procs for d in _children(c)]}  # and their own
        self.llm.llm_engine.engine_core.shutdown()
        _, lingering = psutil.wait_procs(list(mine.values()), timeout=30)  # shutdown() may return before they exit
        for c in lingering:
            c.kill()
        psutil.wait_procs(lingering, timeout=10)

    # ------------------------------------------------------------------------------------------ loop
    def _run(self) -> None:
        """Add requests as they come and step vLLM. A call (a library change) waits until the requests in flight
        have finished, new requests wait behind it: each request is generated with one library, the old or the
        new, whole, as in the embedded engine, whose changes run between batches."""
        engine, calls, held = self.llm.llm_engine, [], []
        while True:
            busy = engine.has_unfinished_requests()
            if busy:
                self._await_work()
            try:
                jobs = [self._q.get()] if not busy and not calls else []  # idle: wait for work
                while True:
                    jobs.append(self._q.get_nowait())
            except queue.Empty:
                pass
            new = []
            for kind, item, fut in jobs:
                if kind == "stop":
                    self._abort_all()
                    return
                if kind == "call":
                    calls.append((item, fut))
                else:
                    (held if calls else new).append((item, fut))  # held: after the pending change
            self._add_all(new)
            self._cancel_gone()
            if calls and not engine.has_unfinished_requests():
                for fn, fut in calls:
                    Engine._resolve(fut, fn, self)
                self._add_all(held)
                calls, held = [], []
            if engine.has_unfinished_requests() and (self._ready is None or not self._ready.empty()):
                self._step(engine)

    def _wake_on_outputs(self):
        """vLLM's queue of the engine core's step outputs (its multiprocess client), made to wake the loop on every
        arrival; None where the client has none (in-process: `step()` runs the forward itself). The engine core
        steps on its own: a loop blocked in `step()` would add requests that arrive meanwhile only after the next
        step, which then runs with the batch short of them."""
        q = getattr(self.llm.llm_engine.engine_core, "outputs_queue", None)
        if not isinstance(q, queue.Queue):
            return None
        put = q.put_nowait  # vLLM's output thread calls this on the object itself

        def put_and_wake(item):
            put(item)
            self._wake.set()
        q.put_nowait = put_and_wake
        return q

    def _await_work(self) -> None:
        """While requests run: wait until the engine core has sent a step's outputs or a job was queued."""
        if self._ready is None:
            return
        self._wake.clear()
        if self._ready.empty() and self._q.empty():  # a put after clear() sets the event again: no lost wake-up
            self._wake.wait(timeout=1.0)

    def _step(self, engine) -> None:
        try:
            outputs = engine.step()
        except Exception as e:  # the engine failed: every live request gets the error
            for rid, (_, fut, *_) in list(self._live.items()):
                fut.set_exception(e)
            self._live.clear()
            return
        self._finish([f for out in outputs if (f := self._deliver(out)) is not None])

    def _add_all(self, items: list[tuple[Request, Future]]) -> None:
        """Add requests that arrived together; per request, their adapters come from one probe over all prompts."""
        items = [(r, f) for r, f in items if still_allowed(r, self._names, f)]
        if not items:
            return
        chosen: list[str | None] = [None] * len(items)
        if self.router is not None:
            try:
                chosen = self.router.choose_many([list(r.prompt) for r, _ in items], [r.allowed for r, _ in items])
            except Exception as e:
                for _, f in items:
                    f.set_exception(e)
                return
        for (request, fut), name in zip(items, chosen):
            self._add(request, fut, name)

    def _add(self, request: Request, fut: Future, name: str | None) -> None:
        """Add one request to vLLM; `name`: its adapter (granularity request), chosen by the probe."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        try:
            routed, carried, lora = self._route(request, name)
        except Exception as e:
            fut.set_exception(e)
            return
        eos = self.tokenizer.eos_token_id
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed,
                                stop_token_ids=[] if eos is None or request.ignore_eos else [eos],
                                ignore_eos=eos is None or request.ignore_eos,
                                detokenize=False, extra_args=carried)
        rid = f"seqr-{next(self._ids)}"
        try:
            served = request.allowed if name is None else {name}  # the adapters its tokens may use
            prompt = {"prompt_token_ids": list(request.prompt), "cache_salt": self._salt(served)}
            self.llm.llm_engine.add_request(rid, prompt, params,
                                            lora_request=None if lora is None else LoRARequest(*lora))
        except Exception as e:
            fut.set_exception(e)
            return
        self._live[rid] = (request, fut, [], (routed, self.manifests.of(self.library, request.allowed)))

    def _salt(self, allowed) -> str:
        """vLLM's prefix-cache salt of a request: the adapters its tokens may use (per token: its allowed set; per
        request: the one chosen) and the library state (generation and this engine's change count), so cached keys
        are reused only by requests served by the same adapters of the same library (the keys depend on both)."""
        sets = hashlib.sha256(json.dumps(sorted(allowed)).encode()).hexdigest()[:16]
        return f"seqr-{sets}-g{self.library.generation}-c{self._state}"

    def _route(self, request: Request, name: str | None) -> tuple[dict, dict | None, tuple[str, int, str] | None]:
        """(the request's routing shares as far as known here, what it carries to the workers in its sampling
        parameters, the LoRA vLLM serves it with): per token, its set's columns and no LoRA; per request, the
        adapter `name` its prompt's probe chose, as its one column or as a vLLM LoRA."""
        if name is None:
            return {}, {SET_KEY: self.columns.of(request.allowed)}, None
        if self.lora:
            return {name: 1.0}, None, self.router.lora(name)
        return {name: 1.0}, {SET_KEY: self.columns.of({name})}, None  # the set narrowed to its adapter

    def _deliver(self, out) -> tuple[str, str] | None:
        """Hand a request its new tokens; (its id, finish reason) once it has finished."""
        if out.request_id not in self._live:
            return None
        request, fut, toks, _ = self._live[out.request_id]
        eos = self.tokenizer.eos_token_id
        for t in out.outputs[0].token_ids[len(toks):]:
            if t == eos and not request.ignore_eos:
                continue
            toks.append(t)
            if request.on_token is not None:
                try:
                    request.on_token(t)
                except Exception:  # its client is gone: stop this request only
                    self._finish([(out.request_id, "cancelled")], abort=True)
                    return None
        if out.finished:
            return out.request_id, "length" if out.outputs[0].finish_reason == "length" else "stop"
        return None

    def _cancel_gone(self) -> None:
        for rid, (request, *_) in list(self._live.items()):
            if request.cancel is not None and request.cancel.is_set():
                self._finish([(rid, "cancelled")], abort=True)

    def _finish(self, done: list[tuple[str, str]], *, abort: bool = False) -> None:
        """Give each (request id, finish reason) its result; per token, the shares of all of them come from the
        workers in one call (not one per request)."""
        if not done:
            return
        if abort:
            self.llm.llm_engine.abort_request([rid for rid, _ in done])
        taken = self.llm.collective_rpc("seqr_take", args=([rid for rid, _ in done],))[0] if self.router is None \
            else {}
        for rid, reason in done:
            request, fut, toks, (routed, manifest) = self._live.pop(rid)
            outside = 0
            if self.router is None:  # per token: the shares of the decisions its forwards made
                routed, outside = _shares(taken.get(rid), request.allowed)
            fut.set_result(Result(toks, reason, routed, len(request.prompt), outside, manifest))

    def _abort_all(self) -> None:
        for rid in list(self._live):
            fut = self._live.pop(rid)[1]
            self.llm.llm_engine.abort_request([rid])
            fut.set_exception(RuntimeError("the engine was closed"))


def _shares(got: dict | None, allowed) -> tuple[dict, int]:
    """(adapter -> share of a request's (token, layer) decisions, decisions outside its set) from the workers'
    counts (`seqr_take`): every token vLLM computed for it (a prefix served from the cache is not)."""
    got = got or {"counts": {}, "outside": 0}
    total = sum(got["counts"].values())
    return ({n: c / total for n, c in got["counts"].items() if n in allowed} if total else {}), got["outside"]


def _children(proc=None) -> list:
    """The live descendants of `proc` (this process by default), multiprocessing's resource tracker left out."""
    import psutil

    try:
        return [c for c in (proc or psutil.Process()).children(recursive=True) if not _resource_tracker(c)]
    except psutil.Error:  # proc has exited
        return []


def _resource_tracker(proc) -> bool:
    """multiprocessing's resource tracker: it outlives everything else and exits with this process."""
    import psutil

    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False
