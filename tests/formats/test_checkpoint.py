import json

import pytest
import torch

import effilm
from effilm.config import ModelConfig
from effilm.errors import CheckpointError
from effilm.models.transformer import build_model


def test_save_load_round_trip(tmp_path):
    cfg = ModelConfig.from_name("tiny-moe", vocab_size=300)
    model = build_model(cfg, seed=11)
    effilm.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "effilm" and meta["schema_version"] == 1 and "model.safetensors" in meta["checksums"]
    back = effilm.load(tmp_path / "ck")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model.eval()(ids).logits)
    assert back.lm_head.weight is back.embed.weight  # tying survives


def test_atomic_save_leaves_old_checkpoint_on_failure(tmp_path, monkeypatch):
    cfg = ModelConfig.from_name("tiny-dense", vocab_size=300)
    effilm.save(build_model(cfg, seed=1), tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import effilm.formats.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "sha256_file", boom)
    with pytest.raises(OSError):
        effilm.save(build_model(cfg, seed=2), tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left behind


def test_corrupt_and_missing_files(tmp_path):
    cfg = ModelConfig.from_name("tiny-dense", vocab_size=300)
    effilm.save(build_model(cfg), tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        effilm.load(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no config.json"):
        effilm.load(tmp_path)
    with pytest.raises(CheckpointError, match="nope: no such model directory"):
        effilm.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: not a directory"):
        effilm.load(tmp_path / "file")


def test_mis_shaped_effilm_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig.from_name("tiny-dense", vocab_size=300)
    effilm.save(build_model(cfg), tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(w))
    sd["layers.2.mlp.down.weight"] = torch.zeros(3, 3)
    save_file(sd, str(w))
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.down\.weight: checkpoint \(3, 3\)"):
        effilm.load(tmp_path / "ck", verify=False)


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os

    from effilm.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    effilm.save(build_model(ModelConfig.from_name("tiny-dense", vocab_size=64)), tmp_path / "ck")
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~mask


def test_every_written_file_follows_the_umask(tmp_path):
    import os
    import stat

    cfg = ModelConfig.from_name("tiny-dense", vocab_size=300, n_layers=1)
    old = os.umask(0o022)
    try:
        effilm.save(build_model(cfg), tmp_path / "ck")
        effilm.save_hf(build_model(cfg), tmp_path / "hf")
        os.umask(0o077)
        effilm.save(build_model(cfg), tmp_path / "private")
    finally:
        os.umask(old)
    for d, want in (("ck", 0o644), ("hf", 0o644), ("private", 0o600)):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / d).iterdir()}
        assert modes and all(m == want for m in modes.values()), (d, modes)
