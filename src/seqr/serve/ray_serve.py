"""`seqr serve ... --ray --replicas K`: the same API as a Ray Serve deployment of K replicas.

Each replica holds the model and the whole library (small next to the model). Admin changes, whichever
replica receives them, go to one `Coordinator` actor. It applies them to the library dir and the auth file
exactly as one process does (atomic writes), bumps a generation number, and answers only once every live
replica has reloaded that generation on its engine's worker, between batches. So after DELETE returns, no
replica routes to the removed adapter, and a request sees the library before or after a change, never half.
Replicas learn of a change by long-polling the coordinator. The library dir and the auth file must be on
storage every replica reads: one machine (a local Ray cluster) or a shared filesystem.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from seqr.serve.control import apply_change

POLL_S = 5.0  # a replica's long poll returns at least this often
STALE_S = 60.0  # a replica silent this long (crashed, or stuck in one batch) is not waited for
_ERRORS = {"ValueError": ValueError, "KeyError": KeyError, "FileNotFoundError": FileNotFoundError}


@dataclass
class _Replica:
    acked: int
    seen: float = field(default_factory=time.monotonic)


class Coordinator:
    """The one writer of a replicated service's library and users (a Ray actor; plain asyncio inside)."""

    def __init__(self, library_dir: str, auth_file: str, *, method: str | None = None, stale_s: float = STALE_S):
        from seqr.serve.server import load_checked

        self.library, self.auth = load_checked(library_dir, auth_file, method)
        self.generation, self.stale_s = 0, stale_s
        self.replicas: dict[str, _Replica] = {}
        self._cond: asyncio.Condition | None = None  # made on first use, inside the actor's event loop
        self._lock: asyncio.Lock | None = None

    def _sync(self) -> tuple[asyncio.Condition, asyncio.Lock]:
        if self._cond is None:
            self._cond, self._lock = asyncio.Condition(), asyncio.Lock()
        return self._cond, self._lock

    # ------------------------------------------------------------------------------------------ replicas
    async def register(self, rid: str) -> int:
        """A new replica joins; it then loads the files, which are at this generation or newer."""
        self.replicas[rid] = _Replica(acked=self.generation)
        return self.generation

    async def names(self) -> list[str]:
        return self.library.names

    async def unregister(self, rid: str) -> None:
        self.replicas.pop(rid, None)

    async def poll(self, rid: str, known: int, timeout: float = POLL_S) -> int:
        """Return the generation once it is past `known`, or after `timeout` seconds."""
        cond, _ = self._sync()
        self._seen(rid)
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.generation > known), timeout)
            except asyncio.TimeoutError:
                pass
        self._seen(rid)
        return self.generation

    async def ack(self, rid: str, generation: int) -> None:
        self._seen(rid)
        self.replicas[rid].acked = max(self.replicas[rid].acked, generation)

    def _seen(self, rid: str) -> None:
        self.replicas.setdefault(rid, _Replica(acked=0)).seen = time.monotonic()

    # ------------------------------------------------------------------------------------------ changes
    async def change(self, op: str, *args) -> tuple:
        """Apply one change, then wait for every live replica to reload it: ("ok", result) or
        ("error", kind, message) for a change refused (nothing changed). Changes are serialised."""
        cond, lock = self._sync()
        async with lock:
            try:
                result = apply_change(self.library, self.auth, op, *args)
            except (ValueError, KeyError, FileNotFoundError) as e:
                return ("error", type(e).__name__, str(e).strip("'\""))
            async with cond:
                self.generation += 1
                cond.notify_all()
            await self._wait_acks(self.generation)
            return ("ok", result)

    async def _wait_acks(self, generation: int) -> None:
        """Wait until every replica acked `generation` or has been silent for stale_s (a dead replica serves
        nothing; a live one's reload is queued on its engine ahead of any request that arrives after it)."""
        while any(r.acked < generation and time.monotonic() - r.seen < self.stale_s for r in self.replicas.values()):
            await asyncio.sleep(0.01)


class RayControl:
    """The server's admin changes, sent to the coordinator (same interface as server.LocalControl)."""

    def __init__(self, coordinator):
        self.coordinator = coordinator

    async def _do(self, op: str, *args):
        status, *rest = await self.coordinator.change.remote(op, *args)
        if status == "error":
            raise _ERRORS[rest[0]](rest[1])
        return rest[0]

    async def add_adapter(self, name: str, path: Path) -> list[str]:
        return await self._do("add", name, str(path))

    async def remove_adapter(self, name: str) -> list[str]:
        return await self._do("remove", name)

    async def put_user(self, user: str, keys: list, adapters: list) -> dict:
        return await self._do("put_user", user, keys, adapters)


class SeqrReplica:
    """One Ray Serve replica: the model, a copy of the library, the auth store, and a follower thread that
    reloads both whenever the coordinator's generation moves (made an ingress deployment in `deploy`)."""

    def __init__(self, spec: dict, coordinator):
        import ray
        import torch

        from seqr.serve.server import build_app

        torch.set_num_threads(spec.pop("threads"))
        self.rid, self.coordinator = uuid.uuid4().hex[:8], coordinator
        self.library_dir = spec["library_dir"]
        self.generation = ray.get(coordinator.register.remote(self.rid))
        self.asgi, self.engine = build_app(**spec, control=RayControl(coordinator), replica=self.rid)
        self._stop = threading.Event()
        threading.Thread(target=self._follow, name="seqr-follow", daemon=True).start()

    def __serve_build_asgi_app__(self):
        return self.asgi

    def _follow(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                g = ray.get(self.coordinator.poll.remote(self.rid, self.generation))
                if g > self.generation:
                    self._catch_up(g)
            except Exception as e:  # keep following; the coordinator stops waiting for us after STALE_S
                print(f"seqr replica {self.rid}: could not follow a change: {e!r}", file=sys.stderr, flush=True)
                time.sleep(1.0)

    def _catch_up(self, generation: int) -> None:
        from seqr.store.library import LoraLibrary

        lib = LoraLibrary.load(self.library_dir)
        lib.path = None  # the coordinator is the only writer
        self.engine.call(lambda e: e.reload(lib)).result()
        self.asgi.state.auth.reload()
        self.generation = generation
        self.coordinator.ack.remote(self.rid, generation)

    def __del__(self):
        if hasattr(self, "_stop"):  # the constructor finished
            self._stop.set()
            self.engine.close()
            self.coordinator.unregister.remote(self.rid)


def deploy(*, library_dir: str, model: str, auth_file: str, replicas: int, host: str, port: int,
           ray_address: str | None = None, method: str | None = None, **app_kwargs):
    """Start (or join) Ray, the coordinator and K replicas behind Ray Serve's HTTP proxy on host:port. `method`:
    the router, by default the library's own (LoraLibrary.default_method: seqr for a shared A, else spectr), as
    one process serves it."""
    import ray
    from ray import serve

    if replicas < 1:
        raise ValueError(f"replicas must be positive, got {replicas}")
    ray.init(address=ray_address, include_dashboard=False, namespace="seqr",
             ignore_reinit_error=True)
    coord = ray.remote(Coordinator).options(num_cpus=0).remote(library_dir, auth_file, method=method)
    ray.get(coord.names.remote())  # surfaces a bad library / auth file here, as an error
    spec = replica_spec(library_dir=library_dir, model=model, auth_file=auth_file, replicas=replicas, method=method,
                        **app_kwargs)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    app = serve.deployment(serve.ingress()(SeqrReplica), name="seqr", num_replicas=replicas,
                           ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    serve.run(app.bind(spec, coord), name="seqr", route_prefix="/", logging_config={"log_level": "WARNING"})
    return coord


def replica_spec(*, replicas: int, method: str | None = None, **app_kwargs) -> dict:
    """What each of `replicas` replicas builds its app from: build_app's keyword arguments (the method None: the
    library's default) and its share of this machine's torch threads."""
    return dict(method=method, threads=max(1, (os.cpu_count() or 1) // replicas), **app_kwargs)


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
