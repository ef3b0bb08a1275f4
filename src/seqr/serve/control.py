"""Admin changes to a served library and its users: the one place they are applied and persisted."""
from __future__ import annotations

import asyncio
from pathlib import Path

from seqr.serve.auth import AuthStore


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
            dropped, auth.users = auth.users, before
            try:
                auth.save()
            except OSError:  # e.g. a full disk: the file keeps the drop, so memory follows the file
                auth.users = dropped
            raise
        return sorted(library.names)
    if op == "put_user":
        user, keys, adapters = args
        u = auth.put_user(user, keys, adapters, set(library.names))
        return {"user": u.name, "adapters": sorted(u.adapters)}
    raise ValueError(f"unknown change {op!r}")


class LocalControl:
    """Library and user changes in one process: library changes run on the engine's worker between batches (so
    a request sees the library before or after a change, never half), persisted to the library dir and the auth
    file."""

    def __init__(self, engine, auth: AuthStore):
        self.engine, self.auth = engine, auth

    async def _on_worker(self, op: str, *args):
        return await asyncio.wrap_future(self.engine.call(
            lambda e: e.change(lambda lib: apply_change(lib, self.auth, op, *args))))

    async def add_adapter(self, name: str, path: Path) -> list[str]:
        return await self._on_worker("add", name, path)

    async def remove_adapter(self, name: str) -> list[str]:
        return await self._on_worker("remove", name)

    async def put_user(self, user: str, keys: list, adapters: list) -> dict:
        return apply_change(self.engine.library, self.auth, "put_user", user, keys, adapters)
