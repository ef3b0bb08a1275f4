"""The HTTP service: an OpenAI-compatible API where every user is routed only among their own adapters.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus text). Every request carries
`Authorization: Bearer KEY`; errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves handler annotations here

from . import files
from .audit import AuditLog
from .auth import AuthStore, Principal
from .generation import Request
from .library import LibraryConflict
from .metrics import Metrics

SUPPORTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "seed",
             "adapters", "seqr", "n", "user", "stream_options"}


@dataclass
class ServeSettings:
    model_name: str = "seqr"
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    default_max_tokens: int = 16
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read to the end
    max_prompt_chars: int = 64 * 1024  # longer prompts get 400 before they are tokenised
    adapters_root: str | None = None  # admins may add adapter dirs found under it, nowhere else
    audit_log: str | None = None  # append-only JSON lines of admin actions (who, what, when, result); None: off
    replica: str | None = None  # this process's id when it is one of several replicas (seqr serve --ray)


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
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
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


def create_app(engine, auth: AuthStore, settings: ServeSettings | None = None, metrics: Metrics | None = None,
               control=None):
    """The FastAPI app. `control` applies admin changes (default: LocalControl, this process only)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    settings = settings or ServeSettings()
    metrics = metrics or Metrics()
    control = control or LocalControl(engine, auth)
    app = FastAPI(title="seqr", docs_url=None, redoc_url=None)
    app.state.engine, app.state.auth, app.state.metrics = engine, auth, metrics
    audit = AuditLog(settings.audit_log)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.error(route_of(request), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # never a stack trace to the client
        metrics.error(route_of(request), 500)
        return JSONResponse(APIError(500, "internal error", "server_error").body(), status_code=500)

    def principal(request: HTTPRequest) -> Principal:
        who = auth.lookup(bearer_key(request))
        if who is None:
            raise APIError(401, "missing or unknown API key (send Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")
        return who

    async def body_of(request: HTTPRequest) -> dict:
        return parse_body(await read_limited(request, settings.max_body_bytes))

    def allowed_for(who: Principal, body: dict) -> set[str]:
        if who.user is None:
            raise APIError(403, "admin keys manage the service; use a user key to generate", "permission_error")
        mine = set(who.user.adapters) & engine.adapters
        asked = body.get("adapters")
        if asked is None:
            chosen = mine
        else:
            if not isinstance(asked, list) or not asked or not all(isinstance(a, str) for a in asked):
                raise APIError(400, "adapters must be a non-empty list of adapter names", param="adapters")
            outside = sorted(set(asked) - mine)
            if outside:
                raise APIError(403, f"not authorised for adapter(s) {outside}", "permission_error", param="adapters")
            chosen = set(asked)
        if not chosen:
            raise APIError(403, f"user {who.user.name!r} may use no adapter of this library", "permission_error")
        return chosen

    def check_common(body: dict) -> tuple[int, float, bool, int | None]:
        unknown = sorted(set(body) - SUPPORTED)
        if unknown:
            raise APIError(400, f"unsupported parameter(s) {unknown}", param=unknown[0])
        if body.get("model") not in (None, settings.model_name):
            raise APIError(404, f"unknown model {body.get('model')!r}; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        n = body.get("n", 1)
        if n != 1:
            raise APIError(400, f"only n=1 is supported, got {n!r}", param="n")
        mt = body.get("max_completion_tokens", body.get("max_tokens", settings.default_max_tokens))
        if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= settings.max_tokens_limit:
            raise APIError(400, f"max_tokens must be an integer in [1, {settings.max_tokens_limit}], got {mt!r}",
                           param="max_tokens")
        temp = body.get("temperature", 0.0)
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0 <= temp <= 2:
            raise APIError(400, f"temperature must be a number in [0, 2], got {temp!r}", param="temperature")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, f"stream must be a boolean, got {stream!r}", param="stream")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
        return mt, float(temp), stream, seed

    async def encode(text: str) -> list[int]:
        check_text(text, settings.max_prompt_chars, "prompt")
        try:  # off the event loop: a long prompt never stalls other requests or /health
            ids = await asyncio.to_thread(lambda: engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        except (TypeError, ValueError, UnicodeError) as e:
            raise APIError(400, f"the prompt cannot be tokenised: {type(e).__name__}", param="prompt") from None
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over the limit of {settings.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")
        return ids

    async def run(request: HTTPRequest, chat: bool):
        t0 = time.perf_counter()
        who = principal(request)
        body = await body_of(request)
        mt, temp, stream, seed = check_common(body)
        allowed = allowed_for(who, body)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise APIError(400, "messages must be a non-empty list of {role, content} strings", param="messages")
            for m in msgs:
                check_text(m["content"], settings.max_prompt_chars, "messages")
            try:
                text = await asyncio.to_thread(engine.tokenizer.apply_chat_template, msgs, tokenize=False,
                                               add_generation_prompt=True)
            except Exception as e:  # a template that rejects these messages (roles, order)
                raise APIError(400, f"messages do not fit the model's chat template: {e}", param="messages") from None
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise APIError(400, "prompt must be a string", param="prompt")
        ids = await encode(text)
        want_summary = bool(body.get("seqr", True))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        loop = asyncio.get_running_loop()
        tokens_q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        try:
            req = Request(ids, allowed, max_tokens=mt, temperature=temp, seed=seed, cancel=cancel,
                          on_token=(lambda t: loop.call_soon_threadsafe(tokens_q.put_nowait, t)) if stream else None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        fut = asyncio.wrap_future(engine.submit(req))

        def finish(result) -> dict:
            metrics.done(route_of(request), time.perf_counter() - t0, len(ids), len(result.tokens), result.routing,
                         result.outside)
            rep = {"replica": settings.replica} if settings.replica else {}
            extra = {"seqr": {"routing": result.routing, "adapters": sorted(allowed), **rep}} if want_summary else {}
            return extra

        if not stream:
            try:
                result = await fut
            except asyncio.CancelledError:
                cancel.set()  # the client went away: stop its row at the next step
                raise
            except Exception as e:
                raise worker_error(e) from None
            text_out = engine.tokenizer.decode(result.tokens, skip_special_tokens=True)
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(result.tokens),
                     "total_tokens": len(ids) + len(result.tokens)}
            choice = ({"index": 0, "message": {"role": "assistant", "content": text_out},
                       "finish_reason": result.finish_reason} if chat else
                      {"index": 0, "text": text_out, "logprobs": None, "finish_reason": result.finish_reason})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                 "created": int(time.time()), "model": settings.model_name, "choices": [choice],
                                 "usage": usage, **finish(result)})

        async def events():
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta_text, reason=None, delta=None, **extra):
                delta = delta or ({"content": delta_text} if delta_text is not None else {})
                c = ({"index": 0, "delta": delta, "finish_reason": reason} if chat else
                     {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": reason})
                return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()),
                                              "model": settings.model_name, "choices": [c], **extra}) + "\n\n"

            if chat:
                yield chunk(None, delta={"role": "assistant"})
            try:
                async for piece in stream_tokens(chunk):
                    yield piece
            finally:  # the client disconnected (or the stream ended): its generation stops at the next step
                cancel.set()

        async def stream_tokens(chunk):
            sent, toks = "", []
            while True:
                getter = asyncio.ensure_future(tokens_q.get())
                done, _ = await asyncio.wait({getter, fut}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    toks.append(getter.result())
                    text_now = engine.tokenizer.decode(toks, skip_special_tokens=True)
                    if len(text_now) > len(sent) and not text_now.endswith("\ufffd"):
                        yield chunk(text_now[len(sent):])
                        sent = text_now
                    continue
                getter.cancel()
                break
            try:
                result = fut.result()
            except Exception as e:  # after the 200 went out: an error event, then the end of the stream
                err = worker_error(e)
                metrics.error(route_of(request), err.status)
                yield "event: error\ndata: " + json.dumps(err.body()) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            while not tokens_q.empty():
                toks.append(tokens_q.get_nowait())
            text_now = engine.tokenizer.decode(toks, skip_special_tokens=True)
            if len(text_now) > len(sent):
                yield chunk(text_now[len(sent):])
            yield chunk(None if chat else "", result.finish_reason, **finish(result))
            yield "data: [DONE]\n\n"

        try:
            while tokens_q.empty() and not fut.done():  # hold the status until the first token or the outcome
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            cancel.set()
            raise
        if tokens_q.empty() and fut.exception() is not None:  # failed before any output: a proper error status
            raise worker_error(fut.exception())
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await run(request, chat=True)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        principal(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "seqr"}]}

    # ------------------------------------------------------------------------------------------ admin
    def admin(request: HTTPRequest) -> None:
        if not principal(request).admin:
            raise APIError(403, "this endpoint needs an admin key", "permission_error")

    async def change(op, *args, action: str, target: str):
        """Apply a library or user change through the control, map its errors to 4xx, and audit the outcome."""
        try:
            out = await _mapped(op, *args)
        except APIError as e:
            audit.record("admin", action, target, f"error {e.status}", message=e.message[:300])
            raise
        audit.record("admin", action, target, "ok")
        return out

    async def _mapped(op, *args):
        try:
            return await op(*args)
        except KeyError as e:
            raise APIError(404, str(e).strip("'\"")) from None
        except LibraryConflict as e:
            raise APIError(409, str(e), code="library_conflict") from None
        except files.LockTimeout as e:
            raise APIError(503, str(e), "server_error", code="library_locked") from None
        except (ValueError, TypeError, FileNotFoundError) as e:  # e.g. an added adapter's malformed config
            raise APIError(400, str(e).strip("'\"")) from None

    @app.post("/admin/adapters")
    async def add_adapter(request: HTTPRequest):
        admin(request)
        body = await body_of(request)
        name, rel = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(rel, str) or "\x00" in rel or "\x00" in name:
            raise APIError(400, "give the adapter's name and its path under the adapters root (strings without "
                                "NUL bytes)", param="path")
        if settings.adapters_root is None:
            raise APIError(400, "this server has no --adapters-root; adding adapters is disabled", param="path")
        root = Path(settings.adapters_root).resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_dir():
            raise APIError(400, f"path {rel!r} is not an adapter directory under the adapters root", param="path")
        names = await change(control.add_adapter, name, path, action="add_adapter", target=name)
        return JSONResponse({"added": name, "adapters": names}, status_code=201)

    @app.delete("/admin/adapters/{name}")
    async def remove_adapter(name: str, request: HTTPRequest):
        admin(request)
        return {"removed": name, "adapters": await change(control.remove_adapter, name, action="remove_adapter",
                                                          target=name)}

    @app.put("/admin/users/{user}")
    async def put_user(user: str, request: HTTPRequest):
        admin(request)
        body = await body_of(request)
        keys, adapters = body.get("keys"), body.get("adapters")
        for field_name, value in (("keys", keys), ("adapters", adapters)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise APIError(400, f"'{field_name}' must be a list of strings", param=field_name)
        return await change(control.put_user, user, keys, adapters, action="put_user", target=user)

    @app.get("/health")
    async def health():
        rep = {"replica": settings.replica} if settings.replica else {}
        return {"status": "ok", "adapters": len(engine.adapters), **rep}

    @app.get("/metrics")
    async def prometheus(request: HTTPRequest):
        """Without a key: counts, latency and the isolation alarm, but no adapter names (they are information);
        with an admin key: everything, the per-adapter routed tokens too."""
        who = auth.lookup(bearer_key(request))
        text = metrics.render() if who is not None and who.admin else metrics.render_public()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
