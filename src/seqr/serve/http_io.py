"""What every HTTP route shares: OpenAI-shaped errors, the bearer key, bounded body reading and JSON parsing,
text limits, the route template metrics are labelled with, and the service's settings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from seqr.serve.audit import AuditLog
from seqr.serve.auth import AuthStore, Principal
from seqr.serve.metrics import Metrics


@dataclass
class ServeSettings:
    model_name: str = "seqr"
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    default_max_tokens: int = 16
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read to the end
    max_prompt_chars: int = 64 * 1024  # longer prompts get 400 before they are tokenised
    adapters_root: str | None = None  # admins may add adapter dirs found under it, nowhere else
    audit_log: str | None = None  # append-only JSON lines: admin actions, and each reply's routing manifest; None: off
    replica: str | None = None  # this process's id when it is one of several replicas (seqr serve --ray)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bearer_key(request) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, if the request has one."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def worker_error(e: BaseException) -> APIError:
    """What a client is told when the engine failed its request: 403 for a permission change, else a bare 500."""
    if isinstance(e, PermissionError):
        return APIError(403, str(e), "permission_error")
    return APIError(500, "internal error", "server_error")


def routing_error(request, status: int, headers: dict | None = None) -> APIError:
    """The router's own refusals in OpenAI's shape: no such path (404), a method the path does not take (405,
    naming the methods its Allow header lists)."""
    where = f"{request.method} {request.url.path}"
    if status == 404:
        return APIError(404, f"no such endpoint: {where}", code="not_found")
    if status == 405:
        allowed = (headers or {}).get("Allow", "")
        return APIError(405, f"method not allowed: {where} (allowed: {allowed})", code="method_not_allowed")
    return APIError(status, f"{where}: HTTP {status}")


def route_of(request) -> str:
    """The matched route's template (e.g. /admin/adapters/{name}), never the raw path: metric labels stay a
    fixed, small set whatever paths clients send."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")


async def read_limited(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (a declared Content-Length over the
    limit is refused before reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes, over the limit of {limit}", code="body_too_large")
    from starlette.requests import ClientDisconnect

    size, chunks = 0, []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away mid-body: its fault, nobody to answer, not a server error
        raise APIError(400, "the client disconnected before sending the whole body", code="client_disconnected") \
            from None
    return b"".join(chunks)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_text(text: str, limit: int, param: str) -> None:
    """Refuse, before tokenising, text over `limit` characters, or that is not valid Unicode (lone surrogates)."""
    if len(text) > limit:
        raise APIError(400, f"{param} has {len(text)} characters, over the limit of {limit}", param=param,
                       code="context_length_exceeded")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode (a lone surrogate at character {e.start})",
                       param=param) from None



@dataclass
class Service:
    """What every route reads: the engine, the auth store, the settings, the metrics, the control that applies
    admin changes, and the audit log. One per app, at `app.state.service`."""

    engine: Any
    auth: AuthStore
    settings: ServeSettings = field(default_factory=ServeSettings)
    metrics: Metrics = field(default_factory=Metrics)
    control: Any = None
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))


def service(request) -> Service:
    return request.app.state.service


def principal(request) -> Principal:
    """The user or admin the request's key names; 401 without a known key."""
    who = service(request).auth.lookup(bearer_key(request))
    if who is None:
        raise APIError(401, "missing or unknown API key (send Authorization: Bearer KEY)", "authentication_error",
                       code="invalid_api_key")
    return who


async def body_of(request) -> dict:
    return parse_body(await read_limited(request, service(request).settings.max_body_bytes))
