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


def launch(serve_args: list[str], *, timeout_s: float = 600) -> tuple:
    """Start `seqr serve SERVE_ARGS --port P` in a child process; return (process, url) once /health answers."""
    import subprocess
    import tempfile

    import httpx

    port = free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server's log never blocks it on a full pipe
    proc = subprocess.Popen([sys.executable, "-m", "seqr.cli", "serve", *serve_args, "--port", str(port)],
                            stderr=log, text=True)
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    log.seek(0)
    raise RuntimeError(f"seqr serve {' '.join(serve_args)} did not come up:\n{log.read()[-3000:]}")


def stop(proc, timeout_s: float = 60) -> None:
    """SIGTERM (a Ray server shuts its cluster down on it), then SIGKILL if it lingers."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", help="a calibrated library dir")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the served base model")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one user each (default 8)")
    p.add_argument("--seconds", type=float, default=30, help="how long the clients send (default 30)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--prompt", default="Write one sentence about the weather.", help="every client's prompt")
    p.add_argument("--ray-replicas", type=int, default=2,
                   help="also run seqr serve --ray with this many replicas, side by side (0: one process only)")
    p.add_argument("--json", help="write the results here")


def cmd_serve(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if a.clients < 1 or a.seconds <= 0 or a.ray_replicas < 0:
        parser.error(f"--clients and --seconds must be positive and --ray-replicas >= 0, got {a.clients}, "
                     f"{a.seconds} and {a.ray_replicas}")
    import tempfile

    import httpx

    from seqr.store.library import LoraLibrary

    names = LoraLibrary.load(a.library).names
    auth = user_auth(names, a.clients)
    keys = [u["keys"][0] for u in auth["users"].values()]
    modes = {"one_process": []}
    if a.ray_replicas:
        modes[f"ray_{a.ray_replicas}_replicas"] = ["--ray", "--replicas", str(a.ray_replicas)]
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/auth.json", "w") as f:
            json.dump(auth, f)
        for label, extra in modes.items():
            print(f"seqr bench serve: {label} ...", file=sys.stderr, flush=True)
            proc, url = launch([a.library, "--model", a.model, "--auth", f"{tmp}/auth.json",
                                "--max-batch", str(a.max_batch), *extra])
            try:
                for k in keys[:4]:  # warm-up, untimed: first forwards allocate
                    httpx.post(url + "/v1/completions", json={"prompt": a.prompt, "max_tokens": 2},
                               headers={"Authorization": f"Bearer {k}"}, timeout=300)
                res[label] = run_load(url, keys, seconds=a.seconds, max_tokens=a.max_tokens, prompt=a.prompt)
            finally:
                stop(proc)
    if len(res) == 2:
        one, ray = res.values()
        res["ray_vs_one_process"] = {"requests_per_s": _ratio(ray["requests_per_s"], one["requests_per_s"]),
                                     "p50": _ratio(ray["p50_s"], one["p50_s"]), "p95": _ratio(ray["p95_s"], one["p95_s"])}
    res["settings"] = {"library": a.library, "model": a.model, "clients": a.clients, "seconds": a.seconds,
                       "max_tokens": a.max_tokens, "max_batch": a.max_batch, "ray_replicas": a.ray_replicas}
    print(json.dumps(res, indent=1))
    for label in modes:
        r = res[label]
        print(f"{label:>16}: {r['requests_per_s']:.3f} req/s, p50 {r['p50_s']} s, p95 {r['p95_s']} s, "
              f"{r['requests']} ok, {r['errors']} errors", file=sys.stderr)
    if a.json:
        from seqr.store import files
        files.atomic_write_json(a.json, res)
    return 0


def _ratio(x, y) -> float | None:
    return round(x / y, 3) if x and y else None
