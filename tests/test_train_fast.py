"""The fast training path: answer-only LM head, length buckets, fast dropout, bf16 base with fp32 adapters."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from seqr.store import files
from seqr.silo.tasks import Example
from seqr.silo.train import (FastDropout, Session, TrainConfig, answer_loss, bucketed_order, collate, encode, lora_model,
                        resume_path, shuffled_order, train)
from tiny_chat import tiny_chat_llama

# answer-only vs full-logits loss: the same sum of the same fp32 log-softmax terms, only fewer rows computed
LOSS_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-5}


def _examples(n: int = 12) -> list[Example]:
    """Prompts of varied length (1-4 repeats of the text) so padding and bucketing matter."""
    return [Example(task="pos", id=f"pos-{i}", text="sample number %d " % i * (1 + i % 4), text_pair=None,
                    choices=("positive", "negative"), label=i % 2) for i in range(n)]


def _peft(tok, dtype=torch.float32, dropout=0.0, path="fast"):
    cfg = TrainConfig(model="tiny-chat", task="pos", out="unused", rank=4, alpha=8, dropout=dropout, path=path)
    pm = lora_model(tiny_chat_llama(len(tok), dtype=dtype), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B so the adapters change the loss and get gradients through A
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_answer_only_loss_and_grads_equal_the_full_logits_loss(tok, dtype):
    pm = _peft(tok, dtype)
    ids, mask, labels = collate([encode(ex, tok) for ex in _examples(6)], tok.pad_token_id)
    full = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    full.backward()
    g_full = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    ans = answer_loss(pm, ids, mask, labels)
    ans.backward()
    assert ans.dtype == torch.float32
    assert abs(ans.item() - full.item()) <= LOSS_TOL[dtype] * max(1.0, abs(full.item()))
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_full[n], rtol=1e-4, atol=1e-6)


def test_answer_loss_never_runs_the_head_on_prompt_positions(tok):
    pm = _peft(tok)
    ids, mask, labels = collate([encode(ex, tok) for ex in _examples(4)], tok.pad_token_id)
    rows = []
    head = pm.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    answer_loss(pm, ids, mask, labels)
    hook.remove()
    assert rows == [int((labels[:, 1:] != -100).sum())]  # one call, exactly the answer-predicting positions


def test_bucketed_order_yields_every_example_once_per_epoch_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=g).tolist()
    padded = {}
    for kind, make in {"bucketed": lambda: bucketed_order(lengths, 8, g, window=4),
                       "shuffled": lambda: shuffled_order(len(lengths), 8, g)}.items():
        waste = 0
        for _ in range(3):  # three epochs, each a permutation
            epoch = make()
            flat = [i for b in epoch for i in b]
            assert sorted(flat) == list(range(len(lengths)))
            assert all(1 <= len(b) <= 8 for b in epoch)
            waste += sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in epoch)
        padded[kind] = waste
    assert padded["bucketed"] < 0.3 * padded["shuffled"]
    e1, e2 = bucketed_order(lengths, 8, torch.Generator().manual_seed(5)), bucketed_order(
        lengths, 8, torch.Generator().manual_seed(5))
    assert e1 == e2  # seeded: deterministic


def test_fast_dropout_matches_dropout_in_distribution():
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    d = FastDropout(0.1).train()
    y = d(x)
    keep = (y != 0).float().mean().item()
    assert abs(keep - 0.9) < 0.005  # 200k Bernoulli(0.9) draws: std 0.0007
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert torch.equal(d.eval()(x), x)


def test_bf16_base_trains_fp32_adapters_and_optimizer_state(tmp_path, tok):
    cfg = TrainConfig(model="tiny-chat", task="pos", out=str(tmp_path / "a"), rank=4, alpha=8, epochs=2, lr=5e-3,
                      batch_size=4)
    model = tiny_chat_llama(len(tok), dtype=torch.bfloat16)
    s = Session(cfg, model, tok, _examples())
    s.step()
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    frozen = [p for p in s.model.parameters() if not p.requires_grad and p.dim() == 2 and p.shape[0] > 4]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # B only (shared A is frozen)
    assert all(st[k].dtype == torch.float32 for st in s.opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert any(p.dtype == torch.bfloat16 for p in frozen)
    while not s.done:
        s.step()
    out = s.finish(tmp_path / "a")
    w = load_file(out / files.PEFT_WEIGHTS)
    assert all(t.dtype == torch.float32 for t in w.values())
    meta = json.loads((out / files.ADAPTER_META).read_text())
    assert meta["base_dtype"] == "bfloat16" and meta["config"]["path"] == "fast" and meta["tokens_per_s"] > 0
    assert 0 <= meta["padding_share"] < 1
    assert next(model.parameters()).dtype == torch.bfloat16 and not hasattr(model, "peft_config")


def test_fast_and_reference_paths_both_lower_the_loss(tmp_path, tok):
    first_last = {}
    for path in ("fast", "reference"):
        cfg = TrainConfig(model="tiny-chat", task="pos", out=str(tmp_path / path), rank=4, alpha=8, epochs=6,
                          lr=1e-2, batch_size=4, path=path)
        out = train(cfg, model=tiny_chat_llama(len(tok)), tokenizer=tok, examples=_examples(), progress=False)
        log = [json.loads(ln) for ln in (out / files.TRAIN_LOG).read_text().splitlines()]
        assert len(log) == 18 and all(r["padded_tokens"] >= r["tokens"] for r in log)
        first_last[path] = (sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3)
    for path, (first, last) in first_last.items():
        assert last < 0.8 * first, (path, first, last)


@pytest.mark.parametrize("field,value,needle", [("path", "slow", "'slow'"), ("dtype", "float16", "'float16'")])
def test_bad_config_values_are_named(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(model="m", task="t", out="o", **{field: value})


def test_train_cli_rejects_a_bad_dtype(capsys):
    from seqr.silo.train import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--task", "sst2", "--out", "o", "--dtype", "fp8"])
    assert e.value.code == 2 and "fp8" in capsys.readouterr().err


class _Stop(Exception):
    pass


@pytest.mark.parametrize("unique_a", [False, True])
def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, tok, unique_a):
    """Kill a run mid-epoch-2 (after its state save), rerun it in a fresh process-like setup: the adapter, loss
    log and snapshots equal an uninterrupted run's exactly (same data order, dropout draws and optimizer state)."""
    def cfg(out):
        return TrainConfig(model="tiny-chat", task="pos", out=str(out), rank=4, alpha=8, dropout=0.1, epochs=2,
                           batch_size=3, lr=1e-2, unique_a=unique_a)  # 4 batches per epoch, 8 steps

    ref = train(cfg(tmp_path / "ref"), model=tiny_chat_llama(len(tok)), tokenizer=tok, examples=_examples(),
                progress=False)
    out = tmp_path / "run"

    def stop_at_6(session, row):
        if row["step"] == 6:
            raise _Stop
    with pytest.raises(_Stop):
        train(cfg(out), model=tiny_chat_llama(len(tok)), tokenizer=tok, examples=_examples(), progress=False,
              state_every=5, on_step=stop_at_6)
    state = resume_path(out)
    assert state.exists() and not out.exists()
    torch.manual_seed(1234)  # a later process starts from another global RNG state
    snaps = []
    train(cfg(out), model=tiny_chat_llama(len(tok)), tokenizer=tok, examples=_examples(), progress=False,
          state_every=5, on_step=lambda s, row: snaps.append(row["step"]))
    assert snaps == [6, 7, 8] and not state.exists()
    a, b = load_file(ref / files.PEFT_WEIGHTS), load_file(out / files.PEFT_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (ref / files.TRAIN_LOG).read_text().count("\n") == 8
    losses = [[json.loads(line)["loss"] for line in (d / files.TRAIN_LOG).read_text().splitlines()] for d in (ref, out)]
    assert losses[0] == losses[1]


def test_a_state_saved_under_another_config_is_refused(tmp_path, tok):
    out = tmp_path / "run"
    cfg = TrainConfig(model="tiny-chat", task="pos", out=str(out), rank=4, alpha=8, epochs=1, batch_size=3)
    s = Session(cfg, tiny_chat_llama(len(tok)), tok, _examples())
    s.step()
    s.save_state(resume_path(out))
    other = TrainConfig(model="tiny-chat", task="pos", out=str(out), rank=4, alpha=8, epochs=1, batch_size=3, lr=5e-3)
    with pytest.raises(ValueError, match="another config"):
        train(other, model=tiny_chat_llama(len(tok)), tokenizer=tok, examples=_examples(), progress=False,
              state_every=2)
