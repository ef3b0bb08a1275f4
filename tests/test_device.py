"""Training, calibration, routing and evaluation on a CUDA device agree with the CPU (skipped without a GPU), and
--device is checked before any model loads."""
from __future__ import annotations

import pytest
import torch

from seqr import LoraLibrary, attach, detach, routing
from seqr.eval.evaluate import EvalConfig, evaluate
from seqr.core.privacy import DPConfig
from seqr.hf.models import device_of
from seqr.silo.calibrate import calibrate
from seqr.silo.private import dp_release, dp_sums
from seqr.silo.train import TrainConfig, train
from seqr.store import files
from test_evaluate import task_examples
from tiny_chat import tiny_chat_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TASKS = ("sst2", "cola")


def test_device_of_names_a_bad_device():
    assert device_of("cpu") == torch.device("cpu")
    for bad in ("tpu", "no-such-device"):
        with pytest.raises(ValueError, match=repr(bad)):
            device_of(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            device_of("cuda")


@pytest.mark.parametrize("verb", ["train", "calibrate", "eval"])
def test_cli_refuses_a_bad_device_in_one_line(verb, tmp_path, capsys):
    from seqr.cli import main

    args = {"train": ["--model", "m", "--task", "sst2", "--out", str(tmp_path / "o")],
            "calibrate": ["--model", "m", "--adapter", str(tmp_path), "--task", "sst2"],
            "eval": ["--library", str(tmp_path)]}[verb]
    with pytest.raises(SystemExit) as e:
        main([verb, *args, "--device", "tpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "'tpu'" in err[0], err


def _adapters(root, tok, device) -> dict[str, str]:
    """Two silos trained and calibrated on `device` (float32 throughout)."""
    out = {}
    for i, task in enumerate(TASKS):
        model = tiny_chat_llama(len(tok)).to(device)
        cfg = TrainConfig(model="tiny-chat", task=task, out=str(root / task), rank=4, alpha=8, epochs=2, lr=2e-2,
                          batch_size=4, dropout=0.0, seed=i)
        train(cfg, model=model, tokenizer=tok, examples=task_examples(task, "train", 8), progress=False)
        calibrate(model, tok, root / task, task_examples(task, "train", 6), progress=False)
        out[task] = str(root / task)
    return out


@cuda
def test_cuda_train_calibrate_route_and_eval_match_the_cpu(tmp_path, tok):
    libs = {d: LoraLibrary.from_peft(_adapters(tmp_path / d, tok, d)) for d in ("cpu", "cuda")}
    for name in TASKS:  # the same B (float32 sums in another order) and the same calibration
        B_cpu, B_gpu = libs["cpu"].adapter_weights(name)[1], libs["cuda"].adapter_weights(name)[1]
        for layer in libs["cpu"].layers:
            torch.testing.assert_close(B_gpu[layer], B_cpu[layer], rtol=1e-3, atol=1e-5)
            s_cpu, s_gpu = libs["cpu"].stats(name)[layer], libs["cuda"].stats(name)[layer]
            assert s_gpu.count == s_cpu.count and abs(s_gpu.mean - s_cpu.mean) <= 1e-4 * s_cpu.mean
    lib = libs["cpu"]
    x = tok(["film plot actor", "the a of sentence"], return_tensors="pt", padding=True)
    outs = {}
    for d in ("cpu", "cuda"):
        model = attach(tiny_chat_llama(len(tok)).to(d), lib)
        with torch.no_grad(), routing(model, "seqr", trace=True) as tr:
            logits = model(**{k: v.to(d) for k, v in x.items()}).logits.float().cpu()
        outs[d] = (logits, tr.choices(), tr.decisions()["margin"])
        assert model.model.layers[0].self_attn.q_proj.bank.B.device.type == d
        detach(model)
    torch.testing.assert_close(outs["cuda"][0], outs["cpu"][0], rtol=1e-4, atol=1e-4)
    clear = outs["cpu"][2].abs() > 1e-3  # decisions whose runner-up is not within float noise
    assert clear.float().mean() > 0.9 and torch.equal(outs["cuda"][1][clear], outs["cpu"][1][clear])
    data = {t: task_examples(t, "dev", 5) for t in TASKS}
    cfg = EvalConfig(tasks=list(TASKS), methods=("base", "oracle", "seqr", "centroid"), noise=(), max_eval=5)
    docs = {d: evaluate(tiny_chat_llama(len(tok)).to(d), tok, {"shared-0": lib}, data, cfg, progress=False)
            for d in ("cpu", "cuda")}
    for method in ("oracle", "seqr", "centroid"):
        for t in TASKS:
            a, b = (docs[d]["libraries"]["shared-0"]["methods"][method]["tasks"][t] for d in ("cpu", "cuda"))
            assert a["pred"] == b["pred"], (method, t)
    assert docs["cuda"]["config"]["dtype"] == "float32"
    assert (tmp_path / "cuda" / TASKS[0] / files.STATS_FILE).exists()


@cuda
def test_cuda_dp_calibration_clips_and_sums_like_the_cpu(tmp_path, tok):
    """The private release's pre-noise sums (clipped per example) do not depend on where the model ran, so the same
    seeded noise gives the same release."""
    adapter = _adapters(tmp_path, tok, "cpu")[TASKS[0]]
    exs = task_examples(TASKS[0], "train", 8)
    cfg = DPConfig(epsilon=1.0, delta=1e-5, clip=0.5, centroid_clip=0.5)
    g = cfg.guarantee(len(exs), centroids=True)
    sums, release = {}, {}
    for d in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = tiny_chat_llama(len(tok)).to(d)
        sums[d] = dp_sums(model, tok, adapter, exs, g.clip, g.centroid_clip, batch_size=4, progress=False)
        release[d] = dp_release(sums[d], g, torch.Generator().manual_seed(7))
    free = dp_sums(tiny_chat_llama(len(tok)).to("cuda"), tok, adapter, exs, 1e9, 1e9, progress=False)
    for layer, v in sums["cpu"].stats.items():
        assert sums["cuda"].stats[layer].device.type == "cpu"
        torch.testing.assert_close(sums["cuda"].stats[layer], v, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sums["cuda"].centroids[layer], sums["cpu"].centroids[layer], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(free.stats[layer], v)  # the bound of 0.5 clipped something
        a, b = release["cpu"][0][layer], release["cuda"][0][layer]
        assert a.privacy == b.privacy and abs(a.mean - b.mean) <= 1e-4 * max(1.0, abs(a.mean))
