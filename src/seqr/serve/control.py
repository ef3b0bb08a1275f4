"""Admin changes to a served library and its users: the one place they are applied and persisted."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from seqr.serve.auth import AuthConflict, AuthStore
from seqr.store import files


def apply_change(library, auth: AuthStore, op: str, *args):
    """One admin change on a library and the auth store, both persisted: "add" (name, adapter dir), "remove"
    (name; also dropped from every user; never the last adapter) or "put_user" (user, keys, adapters). Used by
    LocalControl here and by the Ray coordinator, the only writer when replicas share the files."""
    if op == "add":
        name, path = args
        library.add_peft(name, Path(path))
        return sorted(library.names)
    if op == "remove":
        (name,) = args
        if name not in library:
            raise KeyError(f"unknown adapter {name!r}; the library holds {sorted(library.names)}")
        if len(library) == 1:
            raise ValueError(f"cannot remove {name!r}: it is the library's last adapter")
        before = dict(auth.users)
        auth.drop_adapter(name)  # first: a crash from here on leaves an adapter no user names, never the reverse
        try:
            library.remove(name, allow_empty=False)
        except BaseException:
            try:
                auth.restore(before)
            except (OSError, AuthConflict, files.LockTimeout):  # the file keeps the drop, and so does memory
                pass
            raise
        return sorted(library.names)
    if op == "put_user":
        user, keys, adapters = args
        u = auth.put_user(user, keys, adapters, set(library.names))
        return {"user": u.name, "adapters": sorted(u.adapters)}
    raise ValueError(f"unknown change {op!r}")


class LocalControl:
    """Library and user changes in one process, one at a time: the library's and the auth file's writer locks are
    taken off the engine's worker (so a lock another process holds never stalls generation; a change that cannot
    get them within the lock timeout fails with 503), then the change runs on the worker between batches (a
    request sees the library before or after it, never half; a user's adapters are checked against the library
    on the same thread that removes adapters), writing under the locks it was handed and releasing them before
    the engine reloads the library (vLLM's workers read it back from disk under a shared lock)."""

    def __init__(self, engine, auth: AuthStore):
        self.engine, self.auth = engine, auth
        self._one = asyncio.Lock()

    async def _on_worker(self, op: str, *args):
        async with self._one:
            held, owner = contextlib.ExitStack(), object()
            try:
                await asyncio.to_thread(self._take_locks, held, owner)
                lib = self.engine.library
                lib.lock_owner = self.auth.lock_owner = owner

                def apply(library):  # on the worker, under the handed locks, released before any reload
                    try:
                        return apply_change(library, self.auth, op, *args)
                    finally:
                        library.lock_owner = self.auth.lock_owner = None
                        held.close()

                run = (lambda e: e.change(apply)) if op != "put_user" else (lambda e: apply(e.library))
                return await asyncio.wrap_future(self.engine.call(run))
            finally:
                self.engine.library.lock_owner = self.auth.lock_owner = None
                held.close()

    def _take_locks(self, held: contextlib.ExitStack, owner) -> None:
        """The library directory's and the auth file's writer locks, for `owner` (waits here, not on the worker)."""
        path = self.engine.library.path
        if path is not None:
            held.enter_context(files.dir_lock(path, owner=owner))
        if self.auth.path is not None:
            held.enter_context(files.file_lock(files.lock_file_of(self.auth.path), str(self.auth.path), owner=owner))

    async def add_adapter(self, name: str, path: Path) -> list[str]:
        return await self._on_worker("add", name, path)

    async def remove_adapter(self, name: str) -> list[str]:
        return await self._on_worker("remove", name)

    async def put_user(self, user: str, keys: list, adapters: list) -> dict:
        return await self._on_worker("put_user", user, keys, adapters)
