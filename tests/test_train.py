"""Shared-A training, per-silo calibration, `seqr build` / `seqr info`, on a tiny chat model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seqr import LoraLibrary, NormStats

from seqr.store import files
from seqr.silo.build import build
from seqr.silo.build import main as build_main
from seqr.silo.calibrate import add_noise, calibrate
from seqr.silo.info import main as info_main
from seqr.core.stats import QUANTILE_LEVELS, with_quantiles
from seqr.silo.tasks import Example
from seqr.silo.train import TrainConfig, shared_a, train
from tiny_chat import tiny_chat_llama


def _examples(task: str, n: int = 12) -> list[Example]:
    words = {"pos": ("positive", "negative"), "neg": ("yes", "no")}[task]
    return [Example(task=task, id=f"{task}-{i}", text=f"sample number {i} of {task}", text_pair=None,
                    choices=words, label=i % 2) for i in range(n)]


def _model(tok, seed=0):
    return tiny_chat_llama(len(tok), seed=seed)


def _train(tmp_path, tok, task="pos", name=None, **kw):
    cfg = TrainConfig(model="tiny-chat", task=task, out=str(tmp_path / (name or task)), rank=4, alpha=8,
                      epochs=kw.pop("epochs", 3), lr=kw.pop("lr", 5e-3), batch_size=4, **kw)
    return train(cfg, model=_model(tok), tokenizer=tok, examples=_examples(task), progress=False)


def _weights(path):
    return load_file(path / files.PEFT_WEIGHTS)


def test_shared_a_is_frozen_seeded_and_bit_identical_across_silos(tmp_path, tok):
    a, b = _train(tmp_path, tok, "pos"), _train(tmp_path, tok, "neg")
    wa, wb = _weights(a), _weights(b)
    A_keys = [k for k in wa if "lora_A" in k]
    assert len(A_keys) == 2 * 4  # 2 layers x q, k, v, o
    for key in A_keys:
        assert torch.equal(wa[key], wb[key])  # two silos, same seed: the same A, bit for bit
        layer = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        assert torch.equal(wa[key], shared_a(layer, tuple(wa[key].shape), 0))  # frozen: unchanged by training
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if "lora_B" in k)  # B learned, per silo
    assert all(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # B moved from its zero init
    assert LoraLibrary.from_peft([a, b]).shared_a
    meta = json.loads((a / files.ADAPTER_META).read_text())
    assert meta["a_seed"] == 0 and meta["task"] == "pos" and meta["n_train"] == 12
    other_seed = _train(tmp_path, tok, "neg", name="neg_seed1", a_seed=1)
    assert not LoraLibrary.from_peft([a, other_seed]).shared_a


def test_training_lowers_the_answer_loss_and_logs_every_step(tmp_path, tok):
    out = _train(tmp_path, tok, "pos", epochs=6, lr=1e-2)
    log = [json.loads(line) for line in (out / files.TRAIN_LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 19))  # 12 examples / batch 4 x 6 epochs
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.8 * first
    lrs = [r["lr"] for r in log]
    assert lrs[-1] < 0.1 * max(lrs)  # cosine decays to ~0


def test_training_is_deterministic_and_resumable(tmp_path, tok, capsys):
    a = _train(tmp_path, tok, "pos", name="run1")
    b = _train(tmp_path, tok, "pos", name="run2")
    assert all(torch.equal(v, _weights(b)[k]) for k, v in _weights(a).items())
    mtime = (a / files.PEFT_WEIGHTS).stat().st_mtime_ns
    _train(tmp_path, tok, "pos", name="run1")  # already trained: skipped
    assert (a / files.PEFT_WEIGHTS).stat().st_mtime_ns == mtime and "skipping" in capsys.readouterr().err
    _train(tmp_path, tok, "pos", name="run1", force=True, lr=1e-2)
    assert not torch.equal(_weights(a)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                           _weights(b)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_unique_a_trains_ordinary_lora(tmp_path, tok):
    a = _train(tmp_path, tok, "pos", name="u1", unique_a=True)
    b = _train(tmp_path, tok, "neg", name="u2", unique_a=True, seed=1)
    assert not LoraLibrary.from_peft([a, b]).shared_a
    assert json.loads((a / files.ADAPTER_META).read_text())["a_seed"] is None


def test_calibration_centroids_equal_a_direct_mean_and_can_be_withheld(tmp_path, tok):
    out = _train(tmp_path, tok, "pos")
    model, examples = _model(tok), _examples("pos", 6)
    calibrate(model, tok, out, examples, batch_size=4, progress=False)
    # independent reference: peft's model with the adapter active, one unpadded example at a time; the mean of
    # every token's input to each LoRA layer
    from peft import PeftModel

    from seqr.silo.train import encode
    lib = LoraLibrary.from_peft([out])
    assert lib.has_centroids
    peft_model = PeftModel.from_pretrained(_model(tok), out).eval()
    inputs = {layer: [] for layer in lib.layers}
    for layer in lib.layers:
        peft_model.get_submodule("base_model.model." + layer).register_forward_hook(
            lambda mod, inp, o, layer=layer: inputs[layer].append(inp[0][0].double()))
    with torch.no_grad():
        for ex in examples:
            peft_model(torch.tensor([encode(ex, tok)[0]]))
    for layer in lib.layers:
        want = torch.cat(inputs[layer]).mean(0)  # (n,)
        torch.testing.assert_close(lib.centroids("pos")[layer].double(), want, rtol=1e-5, atol=1e-6)
    calibrate(model, tok, out, examples, batch_size=4, progress=False, centroids=False)
    assert not (out / files.CENTROIDS_FILE).exists()  # withheld: nothing of it leaves the silo
    assert not LoraLibrary.from_peft([out]).has_centroids


@pytest.mark.parametrize("bad", [{"rank": 0}, {"lr": -1.0}, {"dropout": 1.5}, {"max_train": 0},
                                 {"target_modules": ("q_proj", "q-proj")}, {"target_modules": ()},
                                 {"target_modules": ("v_proj", "v_proj")}])
def test_bad_train_config_names_the_value(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        TrainConfig(model="m", task="t", out="o", **bad)


def test_target_modules_choose_the_adapted_layers_and_unknown_ones_are_named(tmp_path, tok, capsys):
    from seqr.core.argfmt import BadValue
    from seqr.silo.train import TARGETS, main

    assert TrainConfig(model="m", task="t", out="o").target_modules == TARGETS == ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")
    out = _train(tmp_path, tok, epochs=1, target_modules=("q_proj", "v_proj"))
    assert {k.split(".")[-3] for k in _weights(out) if "lora_A" in k} == {"q_proj", "v_proj"}
    assert json.loads((out / files.PEFT_CONFIG).read_text())["target_modules"] in (["q_proj", "v_proj"],
                                                                                   ["v_proj", "q_proj"])
    with pytest.raises(BadValue, match=r"\['qv_proj'\] match no layer of the model; .*'q_proj'"):
        _train(tmp_path, tok, name="bad", target_modules=("q_proj", "qv_proj"))
    with pytest.raises(SystemExit) as e:  # the command line: one line naming the value, before any model loads
        main(["--model", "m", "--task", "sst2", "--out", str(tmp_path / "o"), "--target-modules", "q_proj,,v_proj"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and "['q_proj', '', 'v_proj']" in err[0]


def test_calibration_stats_equal_a_brute_force_norm_pass(tmp_path, tok):
    out = _train(tmp_path, tok, "pos")
    model, examples = _model(tok), _examples("pos", 6)
    stats = calibrate(model, tok, out, examples, batch_size=4, progress=False)
    assert not hasattr(model, "_seqr_state")  # the model is handed back untouched
    # independent reference: peft's own model with the adapter active, one unpadded example at a time;
    # hook every LoRA layer and take ||B A x|| (scaling folded) of each token's input x
    from peft import PeftModel

    from seqr.silo.train import encode
    lib = LoraLibrary.from_peft([out])
    A, B = lib.adapter_weights("pos")
    peft_model = PeftModel.from_pretrained(_model(tok), out).eval()
    norms = {layer: [] for layer in lib.layers}
    for layer in lib.layers:
        peft_model.get_submodule("base_model.model." + layer).register_forward_hook(
            lambda mod, inp, o, layer=layer: norms[layer].append((inp[0][0] @ A[layer].T @ B[layer].T).norm(dim=-1)))
    with torch.no_grad():
        for ex in examples:
            peft_model(torch.tensor([encode(ex, tok)[0]]))
    for layer in lib.layers:
        ref = torch.cat(norms[layer]).double()
        assert stats[layer].count == ref.numel()  # every real token, no padding
        assert stats[layer].mean == pytest.approx(ref.mean().item(), rel=1e-5)
        assert stats[layer].std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-4)
        want_q = np.quantile(ref.numpy(), QUANTILE_LEVELS)  # numpy's default: linear interpolation
        np.testing.assert_allclose(stats[layer].quantiles, want_q, rtol=1e-4)
    saved = json.loads((out / files.STATS_FILE).read_text())
    assert saved["examples"] == 6 and set(saved["layers"]) == set(lib.layers)
    assert LoraLibrary.from_peft([out]).stats("pos")[lib.layers[0]].quantiles == stats[lib.layers[0]].quantiles
    private = calibrate(model, tok, out, examples, batch_size=4, progress=False, quantiles=False)
    assert all(s.quantiles is None for s in private.values())  # --no-quantiles: only mu, sigma, counts leave
    assert "quantiles" not in json.dumps(json.loads((out / files.STATS_FILE).read_text()))


def test_noise_shifts_mu_by_sigma_units():
    stats = {f"l{i}": NormStats().update(torch.arange(10.0) + i) for i in range(50)}
    noisy = add_noise(stats, 0.5, seed=3)
    z = torch.tensor([(noisy[k].mean - s.mean) / s.std for k, s in stats.items()])
    assert 0.3 < z.std().item() < 0.7 and all(noisy[k].std == s.std for k, s in stats.items())
    assert add_noise(stats, 0.5, seed=3)["l0"].mean == noisy["l0"].mean  # seeded
    qs = {k: with_quantiles(s, torch.arange(10.0) + int(k[1:])) for k, s in stats.items()}
    moved = add_noise(qs, 0.5, seed=3)  # the whole distribution moves with mu: quantiles shift by the same amount
    for k, s in qs.items():
        assert moved[k].mean == noisy[k].mean
        np.testing.assert_allclose(np.subtract(moved[k].quantiles, s.quantiles), moved[k].mean - s.mean, atol=1e-9)
    with pytest.raises(ValueError, match="noise"):
        add_noise(stats, -1.0)


def test_build_refuses_uncalibrated_and_info_describes(tmp_path, tok, capsys):
    a, b = _train(tmp_path, tok, "pos"), _train(tmp_path, tok, "neg")
    calibrate(_model(tok), tok, a, _examples("pos", 4), progress=False)
    with pytest.raises(ValueError, match=r"without calibration stats: \['neg'\]"):
        build([str(a), str(b)], str(tmp_path / "lib"))
    assert build_main([str(a), str(b), "-o", str(tmp_path / "lib")]) == 2
    calibrate(_model(tok), tok, b, _examples("neg", 4), progress=False)
    assert build_main([str(a), str(b), "-o", str(tmp_path / "lib")]) == 0
    lib = LoraLibrary.load(tmp_path / "lib")
    assert lib.names == ["pos", "neg"] and lib.shared_a and not lib.uncalibrated
    assert lib.bank(lib.layers[0]).mu is not None
    capsys.readouterr()
    assert info_main([str(tmp_path / "lib"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"] == 2 and info["shared_a"] and info["a_seed"] == 0 and info["rank"] == 4
    assert all(r["calibrated"] and r["mu_min"] <= r["mu_mean"] <= r["mu_max"] for r in info["adapter_stats"])


def test_encode_puts_the_loss_on_the_answer_only_in_both_formats(tok):
    from seqr.silo.tasks import build_prompt
    from seqr.silo.train import encode
    ex = _examples("pos", 2)[1]  # label 1: "negative", letter B
    for scoring, answer in (("choices", "negative"), ("letter", "B")):
        ids, labels = encode(ex, tok, scoring)
        n_prompt = len(tok(build_prompt(ex, tok, scoring=scoring), add_special_tokens=False).input_ids)
        assert labels[:n_prompt] == [-100] * n_prompt
        assert tok.decode(labels[n_prompt:]) == answer + tok.eos_token
        assert ids[n_prompt:] == labels[n_prompt:]


def test_train_hands_the_callers_model_back_unchanged(tmp_path, tok):
    model = _model(tok)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cfg = TrainConfig(model="tiny-chat", task="pos", out=str(tmp_path / "a"), rank=4, alpha=8, epochs=1, batch_size=4)
    train(cfg, model=model, tokenizer=tok, examples=_examples("pos"), progress=False)
    assert not any("lora" in name for name, _ in model.named_modules())  # peft's layers are gone
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # base weights untouched
