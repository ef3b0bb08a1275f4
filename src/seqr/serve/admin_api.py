"""The admin and operations routes: GET/POST/DELETE /admin/adapters, PUT /admin/users/{user}, GET /health and
GET /metrics. Admin changes go through the service's control, are mapped to 4xx/503, and are audited."""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi import Request as HTTPRequest  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse, PlainTextResponse

from seqr.core.privacy import guarantees
from seqr.serve.auth import AuthConflict
from seqr.serve.http_io import APIError, Service, bearer_key, body_of, principal, service
from seqr.store import files
from seqr.store.library import LibraryConflict

router = APIRouter()


def admin(request: HTTPRequest) -> Service:
    if not principal(request).admin:
        raise APIError(403, "this endpoint needs an admin key", "permission_error")
    return service(request)


def who(request: HTTPRequest) -> str:
    """The audit log's name for the admin making a request: its key's id, never the key."""
    return f"admin:{principal(request).key_id}"


async def mapped(op, *args):
    """Run a control operation, its failures as the client should see them."""
    try:
        return await op(*args)
    except KeyError as e:
        raise APIError(404, str(e).strip("'\"")) from None
    except LibraryConflict as e:
        raise APIError(409, str(e), code="library_conflict") from None
    except AuthConflict as e:
        raise APIError(409, str(e), code="auth_conflict") from None
    except files.LockTimeout as e:
        raise APIError(503, str(e), "server_error", code="library_locked") from None
    except (ValueError, TypeError, FileNotFoundError) as e:  # e.g. an added adapter's malformed config
        raise APIError(400, str(e).strip("'\"")) from None


async def audited(request: HTTPRequest, action: str, work, target: str = "?"):
    """Run an admin request's `work(svc, seen)` (checks, then the change; it may name the target in
    seen["target"] once it has read the body) and audit its outcome, whatever it is: a refusal before the change
    (a bad path or body) is audited like a failed change."""
    svc = admin(request)
    seen = {"target": target}
    try:
        out = await work(svc, seen)
    except APIError as e:
        svc.audit.record(who(request), action, seen["target"], f"error {e.status}", message=e.message[:300])
        raise
    svc.audit.record(who(request), action, seen["target"], "ok")
    return out


def adapter_dir(svc: Service, name, rel) -> Path:
    """The adapter directory an add names: a path under the server's adapters root, nowhere else, and so is every
    file seqr reads from it (a symlinked file that leads outside is refused like a symlinked directory)."""
    if not isinstance(name, str) or not isinstance(rel, str) or "\x00" in rel or "\x00" in name:
        raise APIError(400, "give the adapter's name and its path under the adapters root (strings without "
                            "NUL bytes)", param="path")
    if svc.settings.adapters_root is None:
        raise APIError(400, "this server has no --adapters-root; adding adapters is disabled", param="path")
    root = Path(svc.settings.adapters_root).resolve()
    try:
        path = (root / rel).resolve()
        inside = path.is_relative_to(root) and path.is_dir()
        outside = [f.name for f in path.iterdir() if f.name in files.ADAPTER_FILES
                   and not f.resolve().is_relative_to(root)] if inside else []
    except (OSError, RuntimeError, ValueError) as e:  # a name too long, a symlink loop, ...
        raise APIError(400, f"path {rel[:200]!r} cannot be used ({type(e).__name__}: "
                            f"{getattr(e, 'strerror', None) or e})", param="path") from None
    if not inside:
        raise APIError(400, f"path {rel[:200]!r} is not an adapter directory under the adapters root", param="path")
    if outside:
        raise APIError(400, f"path {rel[:200]!r}: file(s) {sorted(outside)} lead outside the adapters root "
                            f"(symlinks)", param="path")
    return path


def listing(library) -> dict:
    """Every adapter of the library: calibrated or not, and its DP guarantee (seqr.core.privacy) or None."""
    found = guarantees(library)
    return {"adapters": [{"name": n, "calibrated": library.stats(n) is not None,
                          "privacy": None if g is None else g.to_dict()} for n, g in found.items()],
            "without_privacy_guarantee": [n for n, g in found.items() if g is None]}


@router.get("/admin/adapters")
async def list_adapters(request: HTTPRequest):
    """The served library's adapters with their privacy guarantees (admin key), read on the engine's worker
    between batches: never half of a change."""
    svc = admin(request)
    return await asyncio.wrap_future(svc.engine.call(lambda engine: listing(engine.library)))


@router.post("/admin/adapters")
async def add_adapter(request: HTTPRequest):
    async def work(svc, seen):
        body = await body_of(request)
        name = body.get("name")
        seen["target"] = name if isinstance(name, str) else repr(name)
        path = adapter_dir(svc, name, body.get("path"))
        names = await mapped(svc.control.add_adapter, name, path)
        return JSONResponse({"added": name, "adapters": names}, status_code=201)
    return await audited(request, "add_adapter", work)


@router.delete("/admin/adapters/{name}")
async def remove_adapter(name: str, request: HTTPRequest):
    async def work(svc, seen):
        return {"removed": name, "adapters": await mapped(svc.control.remove_adapter, name)}
    return await audited(request, "remove_adapter", work, name)


@router.put("/admin/users/{user}")
async def put_user(user: str, request: HTTPRequest):
    async def work(svc, seen):
        body = await body_of(request)
        keys, adapters = body.get("keys"), body.get("adapters")
        for field_name, value in (("keys", keys), ("adapters", adapters)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise APIError(400, f"'{field_name}' must be a list of strings", param=field_name)
        return await mapped(svc.control.put_user, user, keys, adapters)
    return await audited(request, "put_user", work, user)


@router.get("/health")
async def health(request: HTTPRequest):
    svc = service(request)
    rep = {"replica": svc.settings.replica} if svc.settings.replica else {}
    return {"status": "ok", "adapters": len(svc.engine.adapters), **rep}


@router.get("/metrics")
async def prometheus(request: HTTPRequest):
    """Without a key: counts, latency and the isolation alarm, but no adapter names (they are information);
    with an admin key: everything, the per-adapter routed tokens too."""
    svc = service(request)
    who = svc.auth.lookup(bearer_key(request))
    text = svc.metrics.render() if who is not None and who.admin else svc.metrics.render_public()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
