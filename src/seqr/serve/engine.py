"""The serving engine: one model, one library, a worker thread that batches requests of different users.

Every job goes through one priority queue and one worker thread. Generation requests that arrive together are
run as one batch, each row with its own user's allowed set (never a union). Library changes (add / remove an
adapter) are jobs too, run between batches and ahead of waiting requests: a request sees the library before or
after a change, never half of one. A removal returns only after the adapter is out of the routing tables and
its file deleted. A batch that fails is rerun row by row, so only the offending request gets the error.
"""
from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from seqr.hf.generation import SEED_RANGE, Request, Result, generate
from seqr.hf.granularity import default_for
from seqr.hf.layers import attach, detach
from seqr.store.digest import calibration_digest
from seqr.store.library import LoraLibrary


CALL, GENERATE, STOP = 0, 1, 2  # queue priorities: changes before waiting requests; the stop after everything


def still_allowed(request: Request, names: frozenset[str], fut: Future) -> bool:
    """Narrow the request's allowed set to the adapters still in the library (one removed since the request was
    checked is no longer routable); with none left, fail its future and return False."""
    allowed = set(request.allowed) & names
    if not allowed:
        fut.set_exception(PermissionError(
            f"none of the request's adapters {sorted(request.allowed)} is in the library any more"))
        return False
    request.allowed = allowed
    return True


@dataclass(order=True)
class _Job:
    priority: int
    seq: int  # FIFO within a priority
    kind: str = field(compare=False)  # "generate" or "call"
    future: Future = field(compare=False)
    request: Request | None = field(default=None, compare=False)
    fn: object = field(default=None, compare=False)


class _Stream:
    """A request's token callback that counts what it delivered and, after a rerun, skips that many tokens."""

    def __init__(self, callback):
        self.callback, self.delivered, self.skip = callback, 0, 0

    def __call__(self, token: int) -> None:
        if self.skip:
            self.skip -= 1
            return
        self.callback(token)
        self.delivered += 1

    def rerun(self) -> None:
        self.skip = self.delivered


class Manifests:
    """Per allowed set, what routes its requests: the router, its granularity, the library generation, the
    calibration digest of the set and its size (cached per set; `clear()` after every library change)."""

    def __init__(self, method: str, mode: dict):
        self.method, self.mode, self._cache = method, mode, {}

    def clear(self) -> None:
        self._cache = {}

    def of(self, library: LoraLibrary, allowed) -> dict:
        key = frozenset(allowed)
        if key not in self._cache:
            self._cache[key] = {"router": self.method, "granularity": self.mode.get("granularity", "token"),
                                "library_generation": library.generation,
                                "calibration": calibration_digest(library, key), "allowed": len(key)}
        return dict(self._cache[key])


class Engine:
    def __init__(self, model, tokenizer, library: LoraLibrary, *, method: str | None = None, max_batch: int = 8,
                 batch_wait_s: float = 0.005, granularity: str | None = None, probe_depth: float = 1.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.model, self.tokenizer, self.library = model, tokenizer, library
        method = library.default_method if method is None else method  # seqr for a shared A, spectr otherwise
        self.method, self.max_batch, self.batch_wait_s = method, max_batch, batch_wait_s
        granularity = default_for(method) if granularity is None else granularity  # request-level for seqr
        self.mode = {"granularity": granularity, "probe_depth": probe_depth}  # how far one decision reaches
        self.manifests = Manifests(method, self.mode)
        attach(model, library, method=method, **self.mode)
        self._q: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._names = frozenset(library.names)
        self._thread = threading.Thread(target=self._run, name="seqr-engine", daemon=True)
        self._thread.start()

    @property
    def adapters(self) -> frozenset[str]:
        """The adapter names requests may currently be routed to."""
        return self._names

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, request: Request) -> Future:
        """Queue one generation. A request without a seed gets one drawn here, so that if its batch has to be
        rerun row by row (a batch-mate failed) it produces the same tokens."""
        if request.seed is None:
            request.seed = secrets.randbelow(SEED_RANGE[1] + 1)
        if request.on_token is not None and not isinstance(request.on_token, _Stream):
            request.on_token = _Stream(request.on_token)
        fut: Future = Future()
        self._q.put(_Job(GENERATE, next(self._seq), "generate", fut, request=request))
        return fut

    def call(self, fn) -> Future:
        """Run fn(engine) on the worker thread before any waiting batch (library changes)."""
        fut: Future = Future()
        self._q.put(_Job(CALL, next(self._seq), "call", fut, fn=fn))
        return fut

    def close(self) -> None:
        self._q.put(_Job(STOP, next(self._seq), "stop", Future()))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------ changes
    def change(self, fn):
        """fn(library) with the library detached from the model (call it on the worker, between batches): routing
        follows whatever fn changed from the next batch on. Returns fn's result."""
        detach(self.model)
        try:
            return fn(self.library)
        finally:
            attach(self.model, self.library, method=self.method, **self.mode)
            self.manifests.clear()
            self._names = frozenset(self.library.names)

    def reload(self, library: LoraLibrary) -> None:
        """Swap in another copy of the library (a replica catching up with a change made elsewhere)."""
        self.change(lambda _: setattr(self, "library", library))

    # ------------------------------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job.kind == "stop":
                return
            if job.kind == "call":
                self._resolve(job.future, job.fn, self)
                continue
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt.kind != "generate":
                    self._q.put(nxt)  # a change or the stop runs right after this batch
                    break
                batch.append(nxt)
            self._generate(batch)

    def _generate(self, batch: list[_Job]) -> None:
        live = []
        for job in batch:
            if still_allowed(job.request, self._names, job.future):
                live.append(job)
        if not live:
            return
        try:
            results = self._run_rows([j.request for j in live])
        except Exception as e:
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for j in live:  # one row broke the batch: rerun each alone, so only the offending request fails
                self._generate_alone(j)
            return
        for j, r in zip(live, results):
            j.future.set_result(r)

    def _generate_alone(self, job: _Job) -> None:
        """Rerun one request by itself; tokens its stream already received (same seed: the same tokens) are not
        sent twice."""
        if isinstance(job.request.on_token, _Stream):
            job.request.on_token.rerun()
        try:
            job.future.set_result(self._run_rows([job.request])[0])
        except Exception as e:
            job.future.set_exception(e)

    def _run_rows(self, requests: list[Request]):
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        results = generate(self.model, requests, eos_id=tok.eos_token_id, pad_id=pad, method=self.method)
        for req, res in zip(requests, results):  # the library cannot change during a batch: the worker runs both
            res.manifest = self.manifests.of(self.library, req.allowed)
        return results

    @staticmethod
    def _resolve(fut: Future, fn, *args) -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)


__all__ = ["Engine", "Request", "Result"]
