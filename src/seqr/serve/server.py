"""The HTTP service: an OpenAI-compatible API where every user is routed only among their own adapters.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent events),
GET /v1/models (openai_api.py); POST/DELETE /admin/adapters, PUT /admin/users/{user}, GET /health, GET /metrics
(admin_api.py). Every request carries `Authorization: Bearer KEY`; errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}. This module assembles the app and loads what it serves.
"""
from __future__ import annotations

from seqr.serve.audit import AuditLog
from seqr.serve.auth import AuthStore
from seqr.serve.control import LocalControl
from seqr.serve.http_io import APIError, Service, ServeSettings, route_of, routing_error
from seqr.serve.metrics import Metrics

__all__ = ["ENGINES", "ServeSettings", "build_app", "create_app", "load_checked", "make_engine"]
ENGINES = ("embedded", "vllm")


def create_app(engine, auth: AuthStore, settings: ServeSettings | None = None, metrics: Metrics | None = None,
               control=None):
    """The FastAPI app. `control` applies admin changes (default: LocalControl, this process only)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from seqr.serve import admin_api, openai_api

    settings = settings or ServeSettings()
    svc = Service(engine, auth, settings, metrics or Metrics(), control or LocalControl(engine, auth),
                  AuditLog(settings.audit_log))
    app = FastAPI(title="seqr", docs_url=None, redoc_url=None)
    app.state.service = svc
    app.state.engine, app.state.auth, app.state.metrics = engine, auth, svc.metrics

    def reply(request, err: APIError, headers: dict | None = None):
        svc.metrics.error(route_of(request), err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return reply(request, exc)

    @app.exception_handler(HTTPException)
    async def _routing(request, exc: HTTPException):  # no such path (404), a method it does not take (405)
        return reply(request, routing_error(request, exc.status_code, exc.headers), exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # never a stack trace to the client
        return reply(request, APIError(500, "internal error", "server_error"))

    app.include_router(openai_api.router)
    app.include_router(admin_api.router)
    return app


def load_checked(library_dir: str, auth_file: str, method: str | None = None):
    """The library and auth file a server starts from, checked against each other: (library, auth)."""
    from seqr.store.library import LoraLibrary

    lib = LoraLibrary.load(library_dir)
    method = method or lib.default_method
    if lib.uncalibrated and method == "seqr":
        raise ValueError(f"adapter(s) {lib.uncalibrated} have no calibration stats; run seqr calibrate")
    auth = AuthStore.load(auth_file)
    auth.check_adapters(set(lib.names))
    return lib, auth


def build_app(library_dir: str, model: str, auth_file: str, *, adapters_root: str | None = None,
              model_name: str | None = None, max_prompt_tokens: int = 2048, max_tokens_limit: int = 1024,
              max_batch: int = 8, method: str | None = None, control=None, replica: str | None = None,
              dtype: str = "auto", engine: str = "embedded", granularity: str | None = None, probe_depth: float = 1.0,
              enforce_eager: bool = False):
    """Load the model, library and auth file and return (app, engine). With a `control` (a replica of
    seqr serve --ray) changes are applied elsewhere, so this process's library copy is not bound to disk.
    `engine`: "embedded" (transformers' generate in this process) or "vllm" (seqr's routed model in vLLM);
    `granularity` / `probe_depth`: how far one routing decision reaches (seqr.routing; default: request-level for
    seqr, per token for the other routers); `enforce_eager`: vLLM runs the model eager, not compiled (engine vllm)."""
    lib, auth = load_checked(library_dir, auth_file, method)
    if control is not None:
        lib.path = None
    engine = make_engine(engine, model, lib, method=method or lib.default_method, max_batch=max_batch, dtype=dtype,
                         max_model_len=max_prompt_tokens + max_tokens_limit, granularity=granularity,
                         probe_depth=probe_depth, enforce_eager=enforce_eager)
    settings = ServeSettings(model_name=model_name or model, max_prompt_tokens=max_prompt_tokens,
                             max_tokens_limit=max_tokens_limit, adapters_root=adapters_root, replica=replica,
                             audit_log=f"{auth_file}.audit.jsonl")  # beside the auth file it records changes to
    return create_app(engine, auth, settings, control=control), engine


def make_engine(kind: str, model: str, lib, *, method: str, max_batch: int, dtype: str, max_model_len: int,
                granularity: str | None = None, probe_depth: float = 1.0, enforce_eager: bool = False):
    """The serving engine `kind` over the model (anything seqr.load_model takes) and library; `enforce_eager`:
    the vllm engine runs the model eager instead of compiled (vLLM's default)."""
    from seqr.hf.granularity import GRANULARITIES, VLLM_SERVED, check_probe_depth, default_for

    granularity = default_for(method) if granularity is None else granularity
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    check_probe_depth(probe_depth, granularity)  # before the model loads

    from seqr.hf.dtypes import name, say_choice
    from seqr.hf.models import load_model, resolve_source

    if enforce_eager and kind != "vllm":
        raise ValueError(f"enforce_eager applies to the vllm engine (the embedded one never compiles), got {kind!r}")
    dtype = say_choice(dtype, "seqr serve")  # auto: bfloat16 where the machine multiplies it natively
    if kind == "vllm":
        if granularity not in VLLM_SERVED:
            raise ValueError(f"--engine vllm routes per token or per request; granularity {granularity!r} is "
                             f"served by the embedded engine")
        try:
            import importlib

            importlib.import_module("vllm")
            from seqr.serve.vllm_engine import VllmEngine
        except ImportError as e:
            raise ValueError(f"--engine vllm needs vLLM ({e}); install it in its own venv: pip install "
                             f"'seqr[vllm]' (README: Serving on vLLM)") from None
        return VllmEngine(resolve_source(model).ref, lib, method=method, dtype=name(dtype), max_batch=max_batch,
                          max_model_len=max_model_len, granularity=granularity, probe_depth=probe_depth,
                          compile=not enforce_eager)
    if kind != "embedded":
        raise ValueError(f"engine must be one of {ENGINES}, got {kind!r}")
    from seqr.serve.engine import Engine

    m, tok = load_model(model, dtype=dtype)
    return Engine(m, tok, lib, method=method, max_batch=max_batch, granularity=granularity, probe_depth=probe_depth)
