"""`seqr serve LIBRARY_DIR --model MODEL --auth AUTH_FILE`: the OpenAI-compatible service (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import socket
import sys

from seqr.hf.dtypes import add_arg as add_dtype_arg
from seqr.hf.granularity import GRANULARITIES, PROBED
from seqr.serve.server import ENGINES, build_app, load_checked
from seqr.core.argfmt import Parser, existing_dir

BACKLOG = 2048  # uvicorn's default


def parser() -> Parser:
    p = Parser(prog="seqr serve", description=(
        "Serve an OpenAI-compatible API; each user is routed only among the adapters their key allows."))
    p.add_argument("library", help="library dir (seqr build)")
    p.add_argument("--model", required=True, help="the base model (anything seqr.load_model takes)")
    p.add_argument("--auth", required=True, help='JSON: {"users": {NAME: {"keys": [...], "adapters": [...]}}, '
                                                 '"admin_keys": [...]}')
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--adapters-root", type=existing_dir,
                   help="admins may add adapter dirs under this dir (POST /admin/adapters)")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max-batch", type=int, default=8, help="requests batched into one forward")
    p.add_argument("--engine", choices=ENGINES, default="embedded",
                   help="embedded: transformers' generate here; vllm: seqr's routed model inside vLLM (continuous "
                        "batching, paged KV cache; needs vLLM installed)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="with --engine vllm: run the model eager; by default vLLM compiles it (torch.compile, inductor "
                        "on CPU: a slower start, faster steps), each routed layer's update one op in the graph")
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (scale-out)")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: replicas, each with model + library")
    p.add_argument("--ray-address", help="with --ray: join this Ray cluster (default: start a local one)")
    p.add_argument("--lock-timeout", type=float, default=10.0,
                   help="seconds an admin change waits for the library's or auth file's lock (held by another "
                        "writer) before it is refused with 503; generation never waits for it")
    p.add_argument("--granularity", choices=GRANULARITIES,
                   help="how far one routing decision reaches: request (seqr's default): one adapter per request "
                        "for every layer and token, chosen by a probe of its prompt (with --engine vllm, prompts "
                        "arriving together share one probe); token: per token and layer (the paper; the other routers' "
                        "default); request-vote: request decided by the prompt tokens' votes; the others: "
                        "embedded engine only")
    p.add_argument("--probe-depth", type=float, default=1.0,
                   help="with --granularity layers / request / request-vote: the share of the routed layers the "
                        "probe sums")
    add_dtype_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not a.lock_timeout >= 0:
        p.error(f"--lock-timeout must be >= 0 seconds, got {a.lock_timeout}")
    if not 0 <= a.port <= 65535:
        p.error(f"--port must be in [0, 65535], got {a.port}")
    if not 0 < a.probe_depth <= 1 or (a.probe_depth != 1 and a.granularity not in (None, *PROBED)):
        probed = f"{', '.join(PROBED[:-1])} or {PROBED[-1]}"
        p.error(f"--probe-depth must be in (0, 1] and needs --granularity {probed}; got {a.probe_depth} with "
                f"--granularity {a.granularity}")
    if a.enforce_eager and a.engine != "vllm":
        p.error(f"--enforce-eager applies to --engine vllm (the {a.engine} engine never compiles)")
    bind_or_exit(p, a.host, a.port).close()  # a taken port fails now, not after the model has loaded
    from seqr.store import files

    files.LOCK_TIMEOUT_S = a.lock_timeout
    if a.ray:
        if a.engine != "embedded":
            p.error("--ray serves the embedded engine; --engine vllm scales out with vLLM's own parallelism")
        return _serve_ray(a, p)
    try:
        app, engine = build_app(a.library, a.model, a.auth, adapters_root=a.adapters_root,
                                model_name=a.served_model_name, max_prompt_tokens=a.max_prompt_tokens,
                                max_tokens_limit=a.max_tokens_limit, max_batch=a.max_batch, dtype=a.dtype,
                                engine=a.engine, granularity=a.granularity, probe_depth=a.probe_depth,
                                enforce_eager=a.enforce_eager)
    except (ValueError, FileNotFoundError) as e:
        print(f"seqr serve: {e}", file=sys.stderr)
        return 2
    try:  # bound only now: the engine's worker processes (vLLM) never inherit the listening socket
        with bind_or_exit(p, a.host, a.port) as sock:
            sock.listen(BACKLOG)
            print(f"seqr serve: {len(engine.adapters)} adapters, listening on http://{a.host}:"
                  f"{sock.getsockname()[1]}", file=sys.stderr, flush=True)  # the port --port 0 was given
            _run(app, engine, sock)
    finally:
        engine.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening (a client is refused until it is); OSError when the
    port is taken or the host is not an address of this machine."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def bind_or_exit(p: argparse.ArgumentParser, host: str, port: int) -> socket.socket:
    """`bind`, or one line naming the address (exit 2)."""
    try:
        return bind(host, port)
    except OSError as e:
        p.error(f"cannot listen on {host}:{port} (--host {host} --port {port}): {e.strerror or e}")


def _run(app, engine, sock: socket.socket) -> None:
    """uvicorn on the listening socket until SIGINT or SIGTERM."""
    import signal

    import uvicorn

    def _term(*_):  # uvicorn re-raises SIGTERM after its graceful exit: close the engine (vLLM's processes) first
        engine.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, _term)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=BACKLOG)).run(sockets=[sock])


def _serve_ray(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    if a.replicas < 1:
        p.error(f"--replicas must be positive, got {a.replicas}")
    from seqr.hf.models import check_model

    check_model(a.model)  # a model no replica could load: one line (ModelLoadError), before Ray starts
    try:
        load_checked(a.library, a.auth)  # fail fast, before starting Ray
        from seqr.serve import ray_serve
    except (ValueError, FileNotFoundError) as e:
        print(f"seqr serve: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("seqr serve --ray needs Ray Serve: pip install 'seqr[ray]'", file=sys.stderr)
        return 2
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ray_serve.deploy(library_dir=a.library, model=a.model, auth_file=a.auth, replicas=a.replicas, host=a.host,
                         port=a.port, ray_address=a.ray_address, adapters_root=a.adapters_root,
                         model_name=a.served_model_name, max_prompt_tokens=a.max_prompt_tokens,
                         max_tokens_limit=a.max_tokens_limit, max_batch=a.max_batch, dtype=a.dtype,
                         granularity=a.granularity, probe_depth=a.probe_depth)
        print(f"seqr serve: {a.replicas} Ray Serve replicas, listening on http://{a.host}:{a.port}",
              file=sys.stderr, flush=True)
        stop.wait()
    except RuntimeError as e:  # Ray Serve could not deploy (its log above says why)
        print(f"seqr serve --ray: the deployment failed: {e}", file=sys.stderr)
        return 1
    finally:
        ray_serve.shutdown()
    return 0
