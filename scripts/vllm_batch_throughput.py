"""Steady-state batch throughput of vLLM on SmolLM2-135M-Instruct: 8 prompts x 16 tokens per call, median of 5
calls after one warm-up, for the base model alone (`plain`), vLLM's LoRA serving (`lora`, 8 adapters), or seqr's
routed model (`seqr`, through VllmEngine, routing per token). Run from .venv-vllm; set VLLM_CPU_OMP_THREADS_BIND (auto / 0-1) and
EAGER=0 (vLLM's torch.compile; vLLM turns it off for its LoRA serving) to compare settings:

    .venv-vllm/bin/python scripts/vllm_batch_throughput.py seqr bfloat16 runs/serve/n10/lib
"""
import json
import os
import statistics
import sys

from seqr.bench.common import timed


def runner(mode: str, dtype: str, lib_dir: str, model: str, prompts: list[list[int]]):
    if mode == "seqr":
        from seqr.hf.generation import Request
        from seqr.serve.vllm_engine import VllmEngine
        from seqr.store.library import LoraLibrary

        lib = LoraLibrary.load(lib_dir)
        eng = VllmEngine(model, lib, dtype=dtype, max_batch=8, max_model_len=512, granularity="token",
                         compile=os.environ.get("EAGER", "1") != "1")

        def run():
            futs = [eng.submit(Request(prompt=p, max_tokens=16, allowed=set(lib.names), ignore_eos=True))
                    for p in prompts]
            return [f.result() for f in futs]
        return run, eng.close
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kw = dict(model=model, dtype=dtype, max_model_len=512, max_num_seqs=8, enforce_eager=os.environ.get("EAGER", "1") == "1")
    peft = os.path.join(os.path.dirname(lib_dir.rstrip("/")), "peft")
    names = sorted(os.listdir(peft))[:8] if mode == "lora" else []
    if names:
        kw.update(enable_lora=True, max_loras=8, max_lora_rank=8)
    llm, sp = LLM(**kw), SamplingParams(max_tokens=16, ignore_eos=True, temperature=0)
    loras = [LoRARequest(n, i + 1, os.path.join(peft, n)) for i, n in enumerate(names)] or None

    def run():
        return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=loras, use_tqdm=False)
    return run, llm.llm_engine.engine_core.shutdown  # its engine processes: os._exit below would leave them running


def main(mode: str, dtype: str = "bfloat16", lib_dir: str = "runs/serve/n10/lib") -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default wants 92% of free memory
    if mode not in ("plain", "lora", "seqr"):
        raise SystemExit(f"mode must be plain, lora or seqr, got {mode!r}")
    from seqr.hf.models import resolve_source

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10 + i] for i in range(8)]
    run, close = runner(mode, dtype, lib_dir, resolve_source("smollm2-135m-instruct").ref, prompts)
    times, _ = timed(run, repeats=5, warmup=1)
    med = statistics.median(times)
    print(json.dumps({"mode": mode, "dtype": dtype, "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                      "eager": os.environ.get("EAGER", "1") == "1", "median_s": round(med, 4),
                      "tokens_per_s": round(8 * 16 / med, 1), "all_s": [round(x, 3) for x in sorted(times)]}),
          flush=True)
    close()
    os._exit(0)  # vLLM's engine processes


if __name__ == "__main__":
    main(*sys.argv[1:])
