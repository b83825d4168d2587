import json

import numpy as np
import pytest
import torch

from matryoshka.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from matryoshka.io import atomic_write_bytes


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _model_and_opt(0)
    torch.manual_seed(123)
    np.random.seed(7)
    save_checkpoint(tmp_path / "step-00000001", model, opt, sched, meta={"step": 1})
    expected_torch, expected_np = torch.rand(3), np.random.rand(3)
    model2, opt2, sched2 = _model_and_opt(1)
    meta = load_checkpoint(tmp_path / "step-00000001.json", model2, opt2, sched2, rng=True)
    assert meta == {"step": 1}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][pid][key], s2["state"][pid][key])
    assert sched2.state_dict() == sched.state_dict()
    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(np.random.rand(3), expected_np)


def test_corrupted_and_torn_checkpoints_are_refused_and_skipped(tmp_path):
    model, opt, sched = _model_and_opt(0)
    good = save_checkpoint(tmp_path / "step-00000001", model, opt, sched, meta={"step": 1})
    bad = save_checkpoint(tmp_path / "step-00000002", model, opt, sched, meta={"step": 2})
    tensors = tmp_path / "step-00000002.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"fail their checksum.*truncated or corrupted"):
        load_checkpoint(bad)
    assert latest_checkpoint(tmp_path) == good
    bad.write_text('{"format": "matryo')  # torn JSON
    with pytest.raises(CheckpointError, match=r"is not valid JSON"):
        load_checkpoint(bad)
    assert latest_checkpoint(tmp_path) == good
    (tmp_path / "step-00000001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"are missing"):
        load_checkpoint(good)
    assert latest_checkpoint(tmp_path) is None


def test_foreign_json_and_missing_file(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match=r"is not a matryoshka-checkpoint/1 file"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "nope.json")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "f.bin", b"one")
    atomic_write_bytes(tmp_path / "a" / "f.bin", b"two")
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.bin"]
