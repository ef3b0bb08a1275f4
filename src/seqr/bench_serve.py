"""`seqr bench serve`: N concurrent clients against the HTTP service for a fixed time: requests/s and
p50/p95 latency, each client a different user with its own adapter subset (so batches mix permissions)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time


def run_load(url: str, keys: list[str], *, seconds: float, max_tokens: int, prompt: str) -> dict:
    """One client thread per key, each sending requests back to back for `seconds`."""
    import httpx

    lat, errors, lock = [], [], threading.Lock()
    stop = time.monotonic() + seconds

    def client(key: str) -> None:
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens},
                           headers={"Authorization": f"Bearer {key}"})
                with lock:
                    (lat if r.status_code == 200 else errors).append(time.perf_counter() - t)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in keys]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {"clients": len(keys), "requests": len(lat), "errors": len(errors), "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 3), "p50_s": round(statistics.median(lat), 4) if lat else None,
            "p95_s": round(q[18], 4) if lat else None}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_auth(names: list[str], clients: int) -> dict:
    """One user per client, each allowed a different pair of adapters (round robin)."""
    users = {f"user{i}": {"keys": [f"sk-bench-user-{i:04d}"],
                          "adapters": sorted({names[i % len(names)], names[(i + 1) % len(names)]})}
             for i in range(clients)}
    return {"users": users, "admin_keys": ["sk-bench-admin-0"]}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", help="a calibrated library dir")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one user each (default 8)")
    p.add_argument("--seconds", type=float, default=30, help="how long the clients send (default 30)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompt", default="Write one sentence about the weather.")
    p.add_argument("--json", help="write the results here")


def cmd_serve(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if a.clients < 1 or a.seconds <= 0:
        parser.error(f"--clients and --seconds must be positive, got {a.clients} and {a.seconds}")
    import tempfile

    import uvicorn

    from .library import LoraLibrary
    from .serve import build_app

    names = LoraLibrary.load(a.library).names
    with tempfile.TemporaryDirectory() as tmp:
        auth_path = f"{tmp}/auth.json"
        with open(auth_path, "w") as f:
            json.dump(user_auth(names, a.clients), f)
        app, engine = build_app(a.library, a.model, auth_path, max_batch=a.max_batch)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        while not srv.started:
            time.sleep(0.05)
        keys = [u["keys"][0] for u in user_auth(names, a.clients)["users"].values()]
        try:
            res = {"one_process": run_load(f"http://127.0.0.1:{port}", keys, seconds=a.seconds,
                                           max_tokens=a.max_tokens, prompt=a.prompt)}
        finally:
            srv.should_exit = True
            th.join(timeout=30)
            engine.close()
    res["settings"] = {"library": a.library, "model": a.model, "clients": a.clients, "seconds": a.seconds,
                       "max_tokens": a.max_tokens, "max_batch": a.max_batch}
    print(json.dumps(res, indent=1))
    if a.json:
        from . import files
        files.atomic_write_json(a.json, res)
    print("seqr bench serve: Ray Serve replicas are not implemented yet; this is the one-process server only",
          file=sys.stderr)
    return 0
