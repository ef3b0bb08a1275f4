"""The OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events) and GET /v1/models. Each request is routed only among the adapters its key allows."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi import Request as HTTPRequest  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from seqr.hf.generation import Request
from seqr.serve.auth import Principal
from seqr.serve.http_io import (APIError, Service, ServeSettings, body_of, check_text, principal, route_of, service,
                                worker_error)

SUPPORTED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "stream", "seed",
             "adapters", "seqr", "n", "user", "stream_options", "ignore_eos"}

router = APIRouter()


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    stream: bool
    seed: int | None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)


@dataclass
class Job:
    """One submitted generation: what its response (JSON or a stream) needs."""

    svc: Service
    request: HTTPRequest
    chat: bool
    ids: list[int]
    allowed: set[str]
    summary: bool
    t0: float
    fut: asyncio.Future | None = None
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    rid: str = ""
    user: str = ""  # who asked (the audit log's name for them)

    def decode(self, toks: list[int]) -> str:
        return self.svc.engine.tokenizer.decode(toks, skip_special_tokens=True)

    def finish(self, result) -> dict:
        """Count the finished request in the metrics; the `seqr` summary the response carries (or none)."""
        self.svc.metrics.done(route_of(self.request), time.perf_counter() - self.t0, len(self.ids),
                              len(result.tokens), result.routing, result.outside)
        replica = self.svc.settings.replica
        rep = {"replica": replica} if replica else {}
        self.svc.audit.record(f"user:{self.user}", "generate", self.rid, "ok", routing=result.routing,
                              tokens=len(result.tokens), **result.manifest, **rep)
        return ({"seqr": {"routing": result.routing, "adapters": sorted(self.allowed), **result.manifest, **rep}}
                if self.summary else {})


def allowed_for(svc: Service, who: Principal, body: dict) -> set[str]:
    """The adapters this request may be routed among: the user's own (live in the library), or the subset asked."""
    if who.user is None:
        raise APIError(403, "admin keys manage the service; use a user key to generate", "permission_error")
    mine = set(who.user.adapters) & svc.engine.adapters
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


def check_sampling(settings: ServeSettings, body: dict) -> Sampling:
    unknown = sorted(set(body) - SUPPORTED)
    if unknown:
        raise APIError(400, f"unsupported parameter(s) {unknown}", param=unknown[0])
    if body.get("model") not in (None, settings.model_name):
        raise APIError(404, f"unknown model {body.get('model')!r}; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n != 1:
        raise APIError(400, f"only n=1 (an integer) is supported, got {n!r}", param="n")
    check_options(body)
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
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"ignore_eos must be a boolean, got {ignore_eos!r}", param="ignore_eos")
    return Sampling(mt, float(temp), stream, seed, ignore_eos)


def check_options(body: dict) -> None:
    """The OpenAI fields seqr accepts but does not act on, and its own `seqr` switch, with the types the API
    defines (a wrong type is a 400 naming the field, never silently taken)."""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, f"user must be a string, got {type(user).__name__}", param="user")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}
                                 and isinstance(opts.get("include_usage", False), bool)):
        raise APIError(400, f"stream_options must be an object {{include_usage: boolean}}, got {opts!r}",
                       param="stream_options")
    summary = body.get("seqr", True)
    if not isinstance(summary, bool):
        raise APIError(400, f"seqr must be a boolean (whether the reply carries the routing summary), got "
                            f"{summary!r}", param="seqr")


async def prompt_text(svc: Service, body: dict, chat: bool) -> str:
    """The prompt as text: `prompt`, or `messages` through the model's chat template (off the event loop)."""
    limit = svc.settings.max_prompt_chars
    if not chat:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise APIError(400, "prompt must be a string", param="prompt")
        return text
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise APIError(400, "messages must be a non-empty list of {role, content} strings", param="messages")
    for i, m in enumerate(msgs):
        check_text(m["role"], limit, f"messages[{i}].role")
        check_text(m["content"], limit, f"messages[{i}].content")
    try:
        return await asyncio.to_thread(svc.engine.tokenizer.apply_chat_template, msgs, tokenize=False,
                                       add_generation_prompt=True)
    except Exception as e:  # a template that rejects these messages (roles, order)
        raise APIError(400, f"messages do not fit the model's chat template: {e}", param="messages") from None


async def encode(svc: Service, text: str) -> list[int]:
    settings = svc.settings
    check_text(text, settings.max_prompt_chars, "prompt")
    try:  # off the event loop: a long prompt never stalls other requests or /health
        ids = await asyncio.to_thread(lambda: svc.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, UnicodeError) as e:
        raise APIError(400, f"the prompt cannot be tokenised: {type(e).__name__}", param="prompt") from None
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(ids) > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens, over the limit of {settings.max_prompt_tokens}",
                       param="prompt", code="context_length_exceeded")
    return ids


async def run(request: HTTPRequest, chat: bool):
    """Check the request, submit it to the engine, and answer with JSON or a stream."""
    t0, svc = time.perf_counter(), service(request)
    who = principal(request)
    body = await body_of(request)
    sampling = check_sampling(svc.settings, body)
    allowed = allowed_for(svc, who, body)
    ids = await encode(svc, await prompt_text(svc, body, chat))
    job = Job(svc, request, chat, ids, allowed, bool(body.get("seqr", True)), t0,
              rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", user=who.user.name)
    loop = asyncio.get_running_loop()
    on_token = (lambda t: loop.call_soon_threadsafe(job.tokens.put_nowait, t)) if sampling.stream else None
    try:
        req = Request(ids, allowed, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                      seed=sampling.seed, cancel=job.cancel, on_token=on_token, ignore_eos=sampling.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    job.fut = asyncio.wrap_future(svc.engine.submit(req))
    return await (stream_response(job) if sampling.stream else json_response(job))


async def json_response(job: Job) -> JSONResponse:
    try:
        result = await job.fut
    except asyncio.CancelledError:
        job.cancel.set()  # the client went away: stop its row at the next step
        raise
    except Exception as e:
        raise worker_error(e) from None
    text, n_in, n_out = job.decode(result.tokens), len(job.ids), len(result.tokens)
    usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": result.finish_reason}
              if job.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason})
    return JSONResponse({"id": job.rid, "object": "chat.completion" if job.chat else "text_completion",
                         "created": int(time.time()), "model": job.svc.settings.model_name, "choices": [choice],
                         "usage": usage, **job.finish(result)})


async def stream_response(job: Job) -> StreamingResponse:
    """Hold the status until the first token or the outcome, so a request that fails before any output gets a
    proper error status; then stream server-sent events."""
    try:
        while job.tokens.empty() and not job.fut.done():
            await asyncio.sleep(0.005)
    except asyncio.CancelledError:
        job.cancel.set()
        raise
    if job.tokens.empty() and job.fut.exception() is not None:
        raise worker_error(job.fut.exception())
    return StreamingResponse(events(job), media_type="text/event-stream")


def chunk(job: Job, delta_text: str | None, reason: str | None = None, delta: dict | None = None, **extra) -> str:
    """One server-sent event of the stream, in OpenAI's chunk shape."""
    delta = delta or ({"content": delta_text} if delta_text is not None else {})
    c = ({"index": 0, "delta": delta, "finish_reason": reason} if job.chat else
         {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": reason})
    obj = "chat.completion.chunk" if job.chat else "text_completion"
    return "data: " + json.dumps({"id": job.rid, "object": obj, "created": int(time.time()),
                                  "model": job.svc.settings.model_name, "choices": [c], **extra}) + "\n\n"


async def events(job: Job):
    if job.chat:
        yield chunk(job, None, delta={"role": "assistant"})
    try:
        async for piece in stream_tokens(job):
            yield piece
    finally:  # the client disconnected (or the stream ended): its generation stops at the next step
        job.cancel.set()


async def stream_tokens(job: Job):
    sent, toks = "", []
    while True:
        getter = asyncio.ensure_future(job.tokens.get())
        done, _ = await asyncio.wait({getter, job.fut}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            break
        toks.append(getter.result())
        text_now = job.decode(toks)
        if len(text_now) > len(sent) and not text_now.endswith("\ufffd"):  # whole characters only
            yield chunk(job, text_now[len(sent):])
            sent = text_now
    try:
        result = job.fut.result()
    except Exception as e:  # after the 200 went out: an error event, then the end of the stream
        err = worker_error(e)
        job.svc.metrics.error(route_of(job.request), err.status)
        yield "event: error\ndata: " + json.dumps(err.body()) + "\n\n"
        yield "data: [DONE]\n\n"
        return
    while not job.tokens.empty():
        toks.append(job.tokens.get_nowait())
    text_now = job.decode(toks)
    if len(text_now) > len(sent):
        yield chunk(job, text_now[len(sent):])
    yield chunk(job, None if job.chat else "", result.finish_reason, **job.finish(result))
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(request: HTTPRequest):
    return await run(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: HTTPRequest):
    return await run(request, chat=True)


@router.get("/v1/models")
async def models(request: HTTPRequest):
    principal(request)
    name = service(request).settings.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "seqr"}]}
