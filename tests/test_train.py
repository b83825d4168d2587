import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from matryoshka.checkpoint import latest_checkpoint
from matryoshka.data.images import ImageSplits
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import load_model, predict_logits, random_shift, train
from tests.helpers import tiny_train_config

TINY = tiny_train_config(backbone_width=64, embed_dim=16, nesting_start=2, epochs=4, batch_size=32)


def test_mrl_training_learns_every_size_and_reloads(tmp_path, mnist_small):
    result = train(replace(TINY, out_dir=str(tmp_path)), mnist_small)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert len(result.history[-1]["val_acc"]) == 4  # 2, 4, 8, 16
    test_acc = (
        (predict_logits(result.model, mnist_small.x_test).argmax(-1) == mnist_small.y_test)
        .double()
        .mean(1)
    )
    assert test_acc[-1] > 0.6, test_acc  # chance is 0.1
    assert test_acc[1] > 0.3, test_acc
    model, meta = load_model(result.model_path)
    assert meta["num_classes"] == 10
    torch.testing.assert_close(
        predict_logits(model, mnist_small.x_test), predict_logits(result.model, mnist_small.x_test)
    )
    # only the last keep_checkpoints=2 checkpoints remain
    assert len(list((tmp_path / "checkpoints").glob("step-*.json"))) == 2


def test_ff_and_tied_build_the_right_heads(tmp_path, mnist_small):
    ff = train(
        replace(TINY, method="ff", embed_dim=4, epochs=1, out_dir=str(tmp_path / "ff")), mnist_small
    )
    assert list(ff.model.nesting) == [4]
    tied = train(replace(TINY, method="mrl-e", epochs=1, out_dir=str(tmp_path / "e")), mnist_small)
    assert tied.model.head.tied


def test_nonfinite_loss_stops_with_step_or_is_skipped(tmp_path, mnist_small):
    x = mnist_small.x_train.clone()
    x[5] = float("nan")
    bad = ImageSplits(
        "bad",
        x,
        mnist_small.y_train,
        mnist_small.x_val,
        mnist_small.y_val,
        mnist_small.x_test,
        mnist_small.y_test,
        10,
    )
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite loss \(nan\) at step \d+ \(epoch 0\).*nonfinite='skip'",
    ):
        train(replace(TINY, epochs=1, out_dir=str(tmp_path / "stop")), bad)
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints") is None
    result = train(replace(TINY, epochs=1, nonfinite="skip", out_dir=str(tmp_path / "skip")), bad)
    assert load_model(result.model_path)[1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_random_shift_is_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 5, 5)
    assert torch.equal(random_shift(x, 0), x)
    out = random_shift(x, 1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for i in range(6):
        crops = [padded[i, :, dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in crops)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "svd"}, r"method='svd' is not one of \['mrl', 'mrl-e', 'ff'\]"),
        ({"backbone": "vgg"}, r"backbone='vgg' is not one of"),
        ({"data": "imagenet"}, r"data='imagenet' is not one of"),
        ({"epochs": 0}, r"epochs=0 must be a positive int"),
        ({"lr": -1.0}, r"lr=-1.0 must be a positive finite float"),
        ({"checkpoint_every": -2}, r"checkpoint_every=-2 must be an int >= 0"),
        ({"nonfinite": "ignore"}, r"nonfinite='ignore' must be 'stop' or 'skip'"),
        ({"nesting": [4, 8], "embed_dim": 16}, r"embed_dim=16 but the nesting's largest size is 8"),
        ({"nesting_weights": [1.0]}, r"weights=\[1.0\] has 1 entries"),
        ({"device": "tpu"}, r"device='tpu' must be 'auto', 'cpu' or 'cuda'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_config_unknown_keys():
    with pytest.raises(
        ValueError,
        match=r"unknown config keys \['epoch'\] for TrainConfig \(did you mean 'epochs'\?\): known keys are",
    ):
        TrainConfig.from_dict({"epoch": 3})


def _train_cmd(out_dir, resume=False):
    cmd = [
        sys.executable,
        "-m",
        "matryoshka.cli",
        "train",
        "--backbone",
        "cnn",
        "--backbone-width",
        "8",
        "--embed-dim",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--checkpoint-every",
        "7",
        "--augment-shift",
        "1",
        "--no-progress",
        "--out-dir",
        str(out_dir),
    ]
    return cmd + (["--resume"] if resume else [])


def test_sigkill_and_resume_ends_bitwise_equal(tmp_path):
    """A real process killed with SIGKILL mid-run and resumed ends with the same weights as an
    uninterrupted run (CPU, same seed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(
        _train_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step-00000021.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "model.json").exists(), "the run finished before the kill"
    resumed = subprocess.run(
        _train_cmd(run_dir, resume=True), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    want = load_file(str(tmp_path / "ref" / "model.safetensors"))
    got = load_file(str(run_dir / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert (tmp_path / "ref" / "history.json").read_text() == (run_dir / "history.json").read_text()
