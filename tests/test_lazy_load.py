"""Loading a library maps its adapter files and reads them on first use (store/loaded.py): the header reader
against safetensors' own, nothing read or verified before use, one adapter read alone, a file deleted after the
load still served, damaged files refused at first use with the file named, no file descriptor per adapter."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_factory import adapter_library, random_stats, tiny_llama
from seqr import LoraLibrary, attach, detach, routing
from seqr.store import files
from seqr.store.loaded import MappedFile

NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(params=["shared", "unique"])
def saved(request, tmp_path):
    """(the library as built, its directory): float16 files, shared A or one A per adapter."""
    lib = random_stats(adapter_library(tmp_path / "silos", NAMES, a_seed=0 if request.param == "shared" else None))
    lib.save(tmp_path / "lib", dtype="float16")
    return lib, tmp_path / "lib"


def _file(root, name):
    man = json.loads((root / files.MANIFEST).read_text())
    return root / next(e["file"] for e in man["adapters"] if e["name"] == name)


def _flip_data_byte(path):
    """Change one byte of the tensor data (the header stays valid, the checksum does not)."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))


def _weights(lib, name):
    A, B = lib.adapter_weights(name)
    return {k: t.float() for k, t in B.items()}, (None if A is None else {k: t.float() for k, t in A.items()})


def test_mapped_file_reads_what_safetensors_reads(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2).bfloat16(), "d": torch.randn(1)}
    save_file(ts, tmp_path / "x.safetensors", metadata={"k": "v"})
    f, ref = MappedFile(tmp_path / "x.safetensors", "test"), load_file(tmp_path / "x.safetensors")
    assert set(f.entries) == set(ref)
    for k, t in ref.items():
        assert f.shape(k) == tuple(t.shape) and f.tensor(k).dtype == t.dtype and torch.equal(f.tensor(k), t)
    assert f.shape("nope") is None
    import hashlib
    assert f.sha256() == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()


def test_mapped_file_reads_a_tensor_not_aligned_to_its_dtype(tmp_path):
    t = torch.arange(6, dtype=torch.float16)
    header = json.dumps({"x": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    header += b" " * (len(header) % 2 == 0)  # 8 + its length odd: the tensor starts at an odd byte
    (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + t.numpy().tobytes())
    assert torch.equal(MappedFile(tmp_path / "odd.safetensors", "test").tensor("x"), t.reshape(2, 3))


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:5], ["5 bytes"]),
    (lambda b: (10 ** 9).to_bytes(8, "little") + b[8:], ["header claims 1000000000 bytes"]),
    (lambda b: b[:-10], ["'x'", "needs 24"]),
    (lambda b: b[:8] + b"[" + b[9:], ["not JSON"]),
])
def test_mapped_file_refuses_damaged_headers_naming_the_file(tmp_path, damage, words):
    save_file({"x": torch.randn(2, 3)}, tmp_path / "x.safetensors")
    p = tmp_path / "x.safetensors"
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        MappedFile(p, "adapter 'x'")
    assert all(w in str(e.value) for w in [str(p), "adapter 'x'", *words]), str(e.value)


def test_a_load_reads_no_tensor_until_first_use(saved):
    lib, root = saved
    _flip_data_byte(_file(root, "gamma"))  # only reading gamma's data could notice
    loaded = LoraLibrary.load(root)
    assert loaded.names == NAMES and loaded.stats("gamma") is not None
    with pytest.raises(ValueError, match=r"'gamma'.*corrupt or truncated \(checksum mismatch\)"):
        loaded.bank(loaded.layers[0])
    with pytest.raises(ValueError, match=r"'gamma'.*corrupt or truncated \(checksum mismatch\)"):
        LoraLibrary.load(root, lazy=False)  # verified before it returns


def test_one_adapter_is_read_from_its_file_alone(saved):
    lib, root = saved
    _flip_data_byte(_file(root, "gamma"))
    loaded = LoraLibrary.load(root)
    B, A = _weights(loaded, "beta")  # beta's file alone: gamma's damage goes unread
    refB, refA = _weights(lib, "beta")
    assert all(torch.equal(B[k], refB[k]) for k in refB)
    assert A is None or all(torch.equal(A[k], refA[k]) for k in refA)
    loaded.remove("alpha")  # O(1): reads alpha's file only, writes the manifest
    assert LoraLibrary.load(root).names == ["delta", "beta", "gamma"]
    with pytest.raises(ValueError, match="'gamma'"):
        loaded.to_peft("gamma", root.parent / "out")


def test_first_use_gives_the_library_that_was_saved(saved):
    lib, root = saved
    for resident in ("float32", "float16"):
        loaded = LoraLibrary.load(root, resident_dtype=resident)
        for layer in loaded.layers:
            bank, ref = loaded.bank(layer), lib.bank(layer)
            assert bank.B.dtype == getattr(torch, resident)
            assert torch.equal(bank.B.float(), ref.B) and torch.equal(bank.mu, ref.mu)
            assert lib.shared_a or torch.equal(bank.A.float(), ref.A)
        for n in NAMES:  # read from the banks now
            assert all(torch.equal(t.float(), lib.adapter_weights(n)[1][k]) for k, t in loaded.adapter_weights(n)[1].items())


def test_a_file_another_process_deletes_after_the_load_is_still_served(saved):
    lib, root = saved
    loaded, beta = LoraLibrary.load(root), _file(root, "beta")
    LoraLibrary.load(root).remove("beta")  # another writer: beta's file is deleted
    assert not beta.exists()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    out = {}
    for label, library in (("lazy", loaded), ("built", lib)):
        model = attach(tiny_llama(), library, granularity="token")
        with torch.no_grad(), routing(model, "seqr" if lib.shared_a else "arrow"):
            out[label] = model(input_ids=ids).logits
        detach(model)
    assert torch.equal(out["lazy"], out["built"])


def test_non_finite_values_are_refused_at_first_use_naming_adapter_and_layer(saved):
    lib, root = saved
    path = _file(root, "delta")
    ts = load_file(path)
    key = sorted(k for k in ts if k.endswith(".B"))[2]
    ts[key][0, 0] = float("nan")
    save_file(ts, path)
    man = json.loads((root / files.MANIFEST).read_text())
    for e in man["adapters"]:
        if e["name"] == "delta":
            e["sha256"] = files.sha256(path.read_bytes())  # a consistent checksum: the values are what is wrong
    (root / files.MANIFEST).write_text(json.dumps(man))
    layer = key.rsplit(".", 1)[0]
    for read in (lambda x: x.bank(x.layers[0]), lambda x: x.adapter_weights("delta")[1][layer]):
        with pytest.raises(ValueError, match=f"'delta', layer {layer}: B contains NaN or inf"):
            read(LoraLibrary.load(root))


def test_a_header_that_does_not_match_the_library_is_refused_at_load(saved):
    lib, root = saved
    path = _file(root, "beta")
    ts = load_file(path)
    key = sorted(k for k in ts if k.endswith(".B"))[1]
    ts[key] = ts[key][:, :2].contiguous()
    save_file(ts, path)
    with pytest.raises(ValueError, match=rf"'beta', layer {key.rsplit('.', 1)[0]}: B must have shape .*, got"):
        LoraLibrary.load(root)


def test_centroids_are_read_at_load_and_routed_with(tmp_path):
    src = random_stats(adapter_library(tmp_path / "silos", NAMES[:3]))
    lib = LoraLibrary(src.meta, src.shared_A)
    g = torch.Generator().manual_seed(3)
    for n in src.names:
        cents = {layer: torch.randn(src.meta.layers[layer][1], generator=g) for layer in src.layers}
        lib.add(n, src.adapter_weights(n)[1], stats=src.stats(n), centroids=cents)
    lib.save(tmp_path / "lib", dtype="float16")
    loaded = LoraLibrary.load(tmp_path / "lib")
    assert loaded.has_centroids
    layer = loaded.layers[1]
    assert torch.equal(loaded.bank(layer).centroids, lib.bank(layer).centroids)


def test_a_loaded_library_holds_no_file_descriptor_per_adapter(tmp_path):
    src = random_stats(adapter_library(tmp_path / "silos", ["a0"]))
    lib = LoraLibrary(src.meta, src.shared_A)
    B = src.adapter_weights("a0")[1]
    for i in range(60):
        lib.add(f"a{i}", {k: t * (i + 1) for k, t in B.items()}, stats=src.stats("a0"))
    lib.save(tmp_path / "lib")
    before = len(os.listdir("/proc/self/fd"))
    loaded = LoraLibrary.load(tmp_path / "lib")
    assert len(os.listdir("/proc/self/fd")) - before < 5
    assert len(loaded._loaded.sources) == 60
    assert torch.equal(loaded.bank(loaded.layers[2]).B, lib.bank(lib.layers[2]).B)
    assert loaded._loaded.sources is None  # read into the stacked rows: the files are unmapped


def test_seqr_info_verify_reads_every_file(saved, capsys):
    from seqr.cli import main

    lib, root = saved
    _flip_data_byte(_file(root, "beta"))
    assert main(["info", str(root), "--json"]) == 0  # headers and manifest only
    capsys.readouterr()
    assert main(["info", str(root), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqr info:") and "'beta'" in err[0] and "checksum mismatch" in err[0]


def _mapped_resident_kib(under) -> int:
    """Resident KiB of this process's mappings of files under `under` (/proc/self/smaps)."""
    import re

    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = line.split()[-1]
            elif line.startswith("Rss:") and current and current.startswith(str(under)):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_a_load_leaves_no_page_of_the_mapped_files_resident(saved):
    lib, root = saved
    loaded = LoraLibrary.load(root)
    assert len(loaded._loaded.sources) == len(NAMES) and _mapped_resident_kib(root) == 0
    loaded.bank(loaded.layers[0])  # first use: read, then unmapped
    assert loaded._loaded.sources is None and _mapped_resident_kib(root) == 0


def test_the_adapter_files_of_a_library_share_one_parsed_header(saved):
    """Every adapter file of a library has one layout: it is parsed and held once, not once per file (120 entries
    per file at SmolLM2's q/k/v/o), and each file is still checked against its own size."""
    lib, root = saved
    loaded = LoraLibrary.load(root)
    entries = [src.entries for src, _ in loaded._loaded.sources]
    assert len(entries) == len(NAMES) and all(e is entries[0] for e in entries)  # one parsed layout, shared
    path = _file(root, "gamma")
    path.write_bytes(path.read_bytes()[:-2])  # the same header, a body two bytes short
    with pytest.raises(ValueError, match=r"'gamma'.*corrupt or truncated \(its tensors end at byte"):
        LoraLibrary.load(root)
