"""The serving engine: one model, one library, a worker thread that batches requests of different users.

Every job goes through one queue and one worker thread. Generation requests that arrive together are run
as one batch, each row with its own user's allowed set (never a union). Library changes (add / remove an
adapter) are jobs too, run between batches: a request sees the library before or after a change, never
half of one. A removal returns only after the adapter is out of the routing tables and its file deleted.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from .generation import Request, Result, generate
from .layers import attach, detach
from .library import LoraLibrary


@dataclass
class _Job:
    kind: str  # "generate" or "call"
    future: Future
    request: Request | None = None
    fn: object = None


class Engine:
    def __init__(self, model, tokenizer, library: LoraLibrary, *, method: str = "seqr", max_batch: int = 8,
                 batch_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.model, self.tokenizer, self.library = model, tokenizer, library
        self.method, self.max_batch, self.batch_wait_s = method, max_batch, batch_wait_s
        attach(model, library, method=method)
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._names = frozenset(library.names)
        self._thread = threading.Thread(target=self._run, name="seqr-engine", daemon=True)
        self._thread.start()

    @property
    def adapters(self) -> frozenset[str]:
        """The adapter names requests may currently be routed to."""
        return self._names

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        self._q.put(_Job("generate", fut, request=request))
        return fut

    def call(self, fn) -> Future:
        """Run fn(engine) on the worker thread between batches (library changes)."""
        fut: Future = Future()
        self._q.put(_Job("call", fut, fn=fn))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------ changes
    def change(self, fn):
        """fn(library) with the library detached from the model (call it on the worker, between batches): routing
        follows whatever fn changed from the next batch on. Returns fn's result."""
        detach(self.model)
        try:
            return fn(self.library)
        finally:
            attach(self.model, self.library, method=self.method)
            self._names = frozenset(self.library.names)

    def reload(self, library: LoraLibrary) -> None:
        """Swap in another copy of the library (a replica catching up with a change made elsewhere)."""
        self.change(lambda _: setattr(self, "library", library))

    # ------------------------------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
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
                if nxt is None or nxt.kind != "generate":
                    self._q.put(nxt)  # keep its order relative to later jobs: run after this batch
                    break
                batch.append(nxt)
            self._generate(batch)

    def _generate(self, batch: list[_Job]) -> None:
        live = []
        for job in batch:  # an adapter removed since the request was checked is no longer routable
            allowed = job.request.allowed & self._names
            if not allowed:
                job.future.set_exception(PermissionError(
                    f"none of the request's adapters {sorted(job.request.allowed)} is in the library any more"))
                continue
            job.request.allowed = allowed
            live.append(job)
        if not live:
            return
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        try:
            results = generate(self.model, [j.request for j in live], eos_id=tok.eos_token_id, pad_id=pad,
                               method=self.method)
        except BaseException as e:  # one bad batch fails its requests, not the worker
            for j in live:
                j.future.set_exception(e)
            return
        for j, r in zip(live, results):
            j.future.set_result(r)

    @staticmethod
    def _resolve(fut: Future, fn, *args) -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)


__all__ = ["Engine", "Request", "Result"]
