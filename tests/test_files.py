"""Atomic writes and verified reads: a failed write never replaces or tears the previous file."""
import os

import pytest
import torch

from seqr.store import files


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    files.atomic_write_bytes(path, b"old")

    def fail(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # the temporary file was removed


def test_read_tensors_checks_checksum_and_format(tmp_path):
    data = files.tensors_to_bytes({"w": torch.arange(6.0).view(2, 3)})
    path = tmp_path / "t.safetensors"
    files.atomic_write_bytes(path, data)
    assert torch.equal(files.read_tensors(path, "test", files.sha256(data))["w"], torch.arange(6.0).view(2, 3))
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        files.read_tensors(path, "test", files.sha256(data))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        files.read_tensors(path, "test")


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        files.read_json(tmp_path / "nope.json", "manifest")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json must hold a JSON object"):
        files.read_json(tmp_path / "list.json", "manifest")
