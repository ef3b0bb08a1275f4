"""`seqr bench serve`: N concurrent clients against the HTTP service for a fixed time: requests/s and
p50/p95 latency, each client a different user with its own adapter subset (so batches mix permissions)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time


def run_load(url: str, keys: list[str], *, seconds: float, max_tokens: int, prompt: str,
             models: list[str] | None = None) -> dict:
    """One client thread per key, each sending requests back to back for `seconds` (client i names `models[i]`
    as the request's model when given: vLLM's own LoRA serving picks the adapter by it)."""
    import httpx

    lat, errors, lock, out_tokens = [], [], threading.Lock(), [0]
    stop = time.monotonic() + seconds

    def client(i: int, key: str) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,  # fixed length
                **({"model": models[i]} if models else {})}
        with httpx.Client(timeout=300) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                with lock:
                    (lat if r.status_code == 200 else errors).append(time.perf_counter() - t)
                    if r.status_code == 200:
                        out_tokens[0] += r.json()["usage"]["completion_tokens"]

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i, k)) for i, k in enumerate(keys)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {"clients": len(keys), "requests": len(lat), "errors": len(errors), "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 3), "output_tokens_per_s": round(out_tokens[0] / wall, 2),
            "p50_s": round(statistics.median(lat), 4) if lat else None,
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


def launch(serve_args: list[str], *, timeout_s: float = 600, command: list[str] | None = None) -> tuple:
    """Start `seqr serve SERVE_ARGS --port P` (or `command SERVE_ARGS --port P`) in a child process; return
    (process, url) once /health answers."""
    import subprocess
    import tempfile

    import httpx

    port = free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server's log never blocks it on a full pipe
    command = command or [sys.executable, "-m", "seqr.cli", "serve"]
    proc = subprocess.Popen([*command, *serve_args, "--port", str(port)],
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
    raise RuntimeError(f"{' '.join(command[2:])} {' '.join(serve_args)[:300]} did not come up:\n{log.read()[-3000:]}")


def stop(proc, timeout_s: float = 60) -> None:
    """SIGTERM (a Ray server shuts its cluster down on it), then SIGKILL if it lingers."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# vllm-lora: vLLM's own serving, one LoRA per request (the reference); vllm-base: vLLM serving the base model with
# no adapter at all, eager as seqr's vLLM engine runs, the ceiling any adapter serving inside vLLM can reach on the
# machine; -compiled: with vLLM's compilation (its default: torch.compile, inductor on CPU)
ENGINES = ("embedded", "vllm", "vllm-compiled", "vllm-lora", "vllm-base", "vllm-base-compiled")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", help="a calibrated library dir")
    p.add_argument("--model", default="smollm2-135m-instruct", help="the served base model")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one user each")
    p.add_argument("--seconds", type=float, default=30, help="how long the clients send")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--prompt", default="Write one sentence about the weather.", help="every client's prompt")
    p.add_argument("--engines", default="embedded",
                   help=f"comma list of {ENGINES}, run one after another: seqr serve's embedded engine, seqr serve "
                        "--engine vllm (SEQR inside vLLM) eager or compiled (its default), `vllm serve --enable-lora` with "
                        "client i's requests on adapter i (needs --peft-root), and `vllm serve` of the base model "
                        "alone (no adapters), eager or compiled (vLLM's default)")
    p.add_argument("--peft-root", help="with vllm-lora: dir of the library's peft adapter dirs, one per name")
    p.add_argument("--dtype", default="auto", help="the servers' --dtype (auto, float32, bfloat16)")
    p.add_argument("--granularity", choices=("token", "request"), default=None,
                   help="seqr servers' --granularity (default: theirs, request for SEQR); token times the routing "
                        "inside vLLM's layers")
    p.add_argument("--ray-replicas", type=int, default=2,
                   help="also run seqr serve --ray with this many replicas, side by side (0: one process only)")
    p.add_argument("--json", help="write the results here")


def _modes(a: argparse.Namespace, parser: argparse.ArgumentParser, names: list[str], auth_file: str) -> dict:
    """label -> (command or None for seqr serve, args, per-client model names or None)."""
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        parser.error(f"--engines takes a comma list of {ENGINES}, got {a.engines!r}")
    seqr_args = [a.library, "--model", a.model, "--auth", auth_file, "--max-batch", str(a.max_batch),
                 "--dtype", a.dtype, *(["--granularity", a.granularity] if a.granularity else [])]
    modes: dict = {}
    if "embedded" in engines:
        modes["one_process"] = (None, seqr_args, None)
        if a.ray_replicas:
            modes[f"ray_{a.ray_replicas}_replicas"] = (None, [*seqr_args, "--ray", "--replicas", str(a.ray_replicas)],
                                                       None)
    if "vllm" in engines:
        modes["vllm"] = (None, [*seqr_args, "--engine", "vllm", "--enforce-eager"], None)
    if "vllm-compiled" in engines:
        modes["vllm_compiled"] = (None, [*seqr_args, "--engine", "vllm"], None)
    if "vllm-lora" in engines:
        modes["vllm_lora_per_request"] = _vllm_lora(a, parser, names)
    if "vllm-base" in engines:
        modes["vllm_base_no_adapters"] = (_VLLM_SERVER, _vllm_args(a), ["base"] * a.clients)
    if "vllm-base-compiled" in engines:
        modes["vllm_base_compiled"] = (_VLLM_SERVER, _vllm_args(a, eager=False), ["base"] * a.clients)
    return modes


_VLLM_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def _vllm_args(a: argparse.Namespace, eager: bool = True) -> list[str]:
    """vLLM's own OpenAI server over the base model, in the dtype seqr serve chooses for `--dtype`; eager, or with
    vLLM's default compilation."""
    from seqr.hf import dtypes
    from seqr.hf.models import resolve_source

    return ["--model", resolve_source(a.model).ref, "--max-num-seqs", str(a.max_batch),
            *(["--enforce-eager"] if eager else []), "--max-model-len", "2048", "--served-model-name", "base",
            "--dtype", dtypes.name(dtypes.choose(a.dtype)[0])]


def _vllm_lora(a: argparse.Namespace, parser: argparse.ArgumentParser, names: list[str]) -> tuple:
    """`vllm serve` with every adapter as a LoRA module; client i sends its requests to adapter i mod N."""
    from pathlib import Path

    if not a.peft_root:
        parser.error("--engines vllm-lora needs --peft-root (the library's peft adapter dirs)")
    dirs = {n: Path(a.peft_root) / n for n in names}
    missing = [n for n, d in dirs.items() if not d.is_dir()]
    if missing:
        parser.error(f"--peft-root {a.peft_root} has no adapter dir for {missing[:5]}")
    rank = json.loads((dirs[names[0]] / "adapter_config.json").read_text())["r"]
    args = [*_vllm_args(a), "--enable-lora", "--max-loras", str(min(a.max_batch, len(names))),
            "--max-cpu-loras", str(len(names)), "--max-lora-rank", str(rank), "--lora-modules",
            *[f"{n}={d}" for n, d in dirs.items()]]
    return _VLLM_SERVER, args, [names[i % len(names)] for i in range(a.clients)]


def cmd_serve(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if a.clients < 1 or a.seconds <= 0 or a.ray_replicas < 0:
        parser.error(f"--clients and --seconds must be positive and --ray-replicas >= 0, got {a.clients}, "
                     f"{a.seconds} and {a.ray_replicas}")
    import tempfile

    from seqr.store.library import LoraLibrary

    names = LoraLibrary.load(a.library).names
    auth = user_auth(names, a.clients)
    keys = [u["keys"][0] for u in auth["users"].values()]
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/auth.json", "w") as f:
            json.dump(auth, f)
        modes = _modes(a, parser, names, f"{tmp}/auth.json")
        for label, (command, args, models) in modes.items():
            print(f"seqr bench serve: {label} ...", file=sys.stderr, flush=True)
            res[label] = _measure(a, command, args, keys, models)
    _add_ratios(res)
    res["settings"] = {"library": a.library, "adapters": len(names), "model": a.model, "clients": a.clients,
                       "seconds": a.seconds, "max_tokens": a.max_tokens, "max_batch": a.max_batch,
                       "engines": a.engines, "dtype": a.dtype, "ray_replicas": a.ray_replicas}
    print(json.dumps(res, indent=1))
    for label in modes:
        r = res[label]
        print(f"{label:>22}: {r['requests_per_s']:.3f} req/s, {r['output_tokens_per_s']} tok/s, p50 {r['p50_s']} s, "
              f"p95 {r['p95_s']} s, {r['requests']} ok, {r['errors']} errors, started in {r['start_s']} s",
              file=sys.stderr)
    if a.json:
        from seqr.store import files
        files.atomic_write_json(a.json, res)
    return 0


def _measure(a: argparse.Namespace, command, args: list[str], keys: list[str], models) -> dict:
    import time

    import httpx

    t0 = time.perf_counter()
    proc, url = launch(args, command=command, timeout_s=900)
    start_s = round(time.perf_counter() - t0, 1)  # until the server answers: load, profile and (if on) compile
    try:
        for i, k in enumerate(keys[:4]):  # warm-up, untimed: first forwards allocate
            body = {"prompt": a.prompt, "max_tokens": 2, **({"model": models[i]} if models else {})}
            httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {k}"}, timeout=300)
        return {**run_load(url, keys, seconds=a.seconds, max_tokens=a.max_tokens, prompt=a.prompt, models=models),
                "start_s": start_s}
    finally:
        stop(proc)


def _add_ratios(res: dict) -> None:
    """Side-by-side ratios of the modes measured in this run."""
    pairs = [("ray_vs_one_process", next((k for k in res if k.startswith("ray_")), None), "one_process"),
             ("vllm_vs_one_process", "vllm", "one_process"),
             ("vllm_compiled_vs_one_process", "vllm_compiled", "one_process"),
             ("vllm_vs_vllm_lora_per_request", "vllm", "vllm_lora_per_request"),
             ("vllm_vs_vllm_base_no_adapters", "vllm", "vllm_base_no_adapters"),
             ("vllm_compiled_vs_vllm_base_compiled", "vllm_compiled", "vllm_base_compiled"),
             ("vllm_compiled_vs_eager", "vllm_compiled", "vllm"),
             ("vllm_base_compiled_vs_eager", "vllm_base_compiled", "vllm_base_no_adapters"),
             ("vllm_base_no_adapters_vs_one_process", "vllm_base_no_adapters", "one_process")]
    for label, x, y in pairs:
        if x in res and y in res:
            res[label] = {"requests_per_s": _ratio(res[x]["requests_per_s"], res[y]["requests_per_s"]),
                          "output_tokens_per_s": _ratio(res[x]["output_tokens_per_s"], res[y]["output_tokens_per_s"]),
                          "p50": _ratio(res[x]["p50_s"], res[y]["p50_s"]), "p95": _ratio(res[x]["p95_s"], res[y]["p95_s"])}


def _ratio(x, y) -> float | None:
    return round(x / y, 3) if x and y else None
