"""The streaming image path: image folders and tar shards through a DataLoader, bad images,
determinism and resume, DDP sharding, the ImageNet ResNet-50 recipe on a tiny folder."""

import io
import os
import subprocess
import sys
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from matryoshka.checkpoint import latest_checkpoint
from matryoshka.config import load_recipe
from matryoshka.data.image_stream import (
    StepBatchSampler,
    UnreadableImageError,
    epoch_order,
    micro_plan,
    open_folder,
    open_tar_shards,
    progressive_size,
    tar_steps,
)
from matryoshka.data.images import load_image_folder
from matryoshka.training.config import TrainConfig
from matryoshka.training.image import build_scheduler, evaluate_split, load_model, train

ROOT = Path(__file__).parent.parent


def _image(rng: np.random.Generator, label: int, side: int, gray: bool) -> Image.Image:
    """A noisy image whose brightness pattern depends on the label (learnable)."""
    base = np.zeros((side, side), dtype=np.float64)
    base[: side // 2] = 200.0 if label % 2 == 0 else 40.0
    base[side // 2 :] = 40.0 if label % 2 == 0 else 200.0
    if label >= 2:
        base = base.T
    px = np.clip(base + rng.normal(0, 20, (side, side)), 0, 255).astype(np.uint8)
    return Image.fromarray(px, mode="L") if gray else Image.fromarray(np.stack([px] * 3, -1))


def make_folder(
    root: Path, per_class: dict[str, int], classes: int = 2, side: int = 20, gray: bool = False
) -> Path:
    """``root/<split>/class_<k>/<i>.png`` for each split in ``per_class`` (``{"": n}``: one
    tree ``root/class_<k>/...``)."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(rng, c, side, gray).save(folder / f"{i:03d}.png")
    return root


def make_shards(root: Path, split: str, shards: list[int], side: int = 16) -> None:
    """``root/<split>/shard-<k>.tar`` with ``shards[k]`` samples (``key.png`` + ``key.cls``)."""
    rng = np.random.default_rng(1)
    (root / split).mkdir(parents=True, exist_ok=True)
    n = 0
    for k, count in enumerate(shards):
        with tarfile.open(root / split / f"shard-{k:03d}.tar", "w") as tar:
            for _ in range(count):
                label = n % 2
                buf = io.BytesIO()
                _image(rng, label, side, False).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{n:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1


def stream_config(root: Path, out: Path, **kw: object) -> TrainConfig:
    fields: dict = {
        "data": "folder",
        "data_root": str(root),
        "loader": "stream",
        "backbone": "cnn_tiny",
        "embed_dim": 8,
        "nesting_start": 2,
        "epochs": 2,
        "batch_size": 8,
        "image_size": 16,
        "augment": "crop-flip",
        "lr": 0.01,
        "device": "cpu",
        "progress": False,
        "out_dir": str(out),
        **kw,
    }
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"), {"train": 12, "val": 4})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_open_folder_layouts_and_the_memory_split(tmp_path, split_folder):
    data = open_folder(split_folder)
    assert data.sizes() == {"train": 24, "val": 8, "test": 8}  # no test/: val is the test split
    assert data.classes == ["class_0", "class_1"]
    assert data.num_classes == 2
    assert data.train.name(0) == "class_0/000.png"
    tree = make_folder(tmp_path / "tree", {"": 10}, gray=True)
    one = open_folder(tree, seed=3)
    assert one.sizes() == {"train": 14, "val": 2, "test": 4}  # stratified 0.7/0.1/0.2
    mem = load_image_folder(tree, image_size=20, grayscale=True, seed=3)
    assert mem.sizes() == one.sizes()
    assert torch.equal(mem.y_test, torch.as_tensor(one.test.labels))


def test_step_sampler_shards_the_in_memory_batches():
    """Each rank loads its shard of the same global batches the in-memory path uses; together
    the ranks load each batch exactly once."""
    order = epoch_order(50, seed=4, epoch=1)
    for world, accum in ((1, 1), (2, 1), (3, 2)):
        per_rank = [list(StepBatchSampler(50, 16, 4, 1, accum, r, world)) for r in range(world)]
        for step, idx in enumerate(order.split(16)):
            got = sorted(i for r in range(world) for i in per_rank[r][step])
            if len(idx) >= world * accum:
                assert got == sorted(idx.tolist())
            else:  # idle ranks load a zero-weight example (the last batch: 2 of 50)
                assert sorted(set(got)) == sorted(idx.tolist())
    resumed = list(StepBatchSampler(50, 16, 4, 1, 1, 0, 1, start=2))
    assert resumed == [order.split(16)[2].tolist(), order.split(16)[3].tolist()]
    # a rank with nothing to do in a micro-batch loads one example with weight 0
    assert micro_plan(1, 1, 1, 2)[0][1] == 0.0


def test_streamed_folder_trains_reloads_and_evaluates(tmp_path, split_folder):
    result = train(stream_config(split_folder, tmp_path / "run", num_workers=0))
    assert [h["bad_images"] for h in result.history] == [0, 0]
    assert len(result.history[-1]["val_acc"]) == 3  # sizes 2, 4, 8
    model, meta = load_model(result.model_path)
    assert meta["input_shape"] == [3, 16, 16]
    assert meta["classes"] == ["class_0", "class_1"]
    cfg = stream_config(split_folder, tmp_path / "run")
    acc = evaluate_split(model, cfg, "val")
    assert acc == pytest.approx(result.history[-1]["val_acc"])
    assert evaluate_split(model, cfg, "test") == acc  # no test/ folder: val is the test split


def test_workers_do_not_change_the_result_and_resume_is_exact(tmp_path, split_folder):
    """Augmentation is seeded per image, so 0 or 2 workers give the same weights; a run cut at
    a mid-epoch checkpoint and resumed ends where an uninterrupted one does."""
    ref = stream_config(split_folder, tmp_path / "ref", checkpoint_every=2, keep_checkpoints=10)
    train(ref)
    two = train(replace(ref, num_workers=2, out_dir=str(tmp_path / "two")))
    want = _weights(tmp_path / "ref")
    for key, value in _weights(tmp_path / "two").items():
        assert torch.equal(value, want[key]), key
    # cut: keep the checkpoints up to step 5 (mid-epoch 2 of 3 steps each), drop the rest
    cut = tmp_path / "cut"
    train(replace(ref, out_dir=str(cut)))
    for f in (cut / "checkpoints").glob("step-*"):
        if int(f.name.split("-")[1].split(".")[0]) > 5:
            f.unlink()
    (cut / "model.json").unlink()
    last = latest_checkpoint(cut / "checkpoints")
    assert last is not None
    assert last.name.startswith("step-00000004")
    train(replace(ref, out_dir=str(cut), resume=True))
    for key, value in _weights(cut).items():
        assert torch.equal(value, want[key]), key
    assert two.history == train(replace(ref, out_dir=str(tmp_path / "again"))).history


def _break(folder: Path) -> list[Path]:
    bad = [
        folder / "train" / "class_0" / "zz_not_an_image.png",
        folder / "train" / "class_1" / "zz_cut.png",
    ]
    bad[0].write_bytes(b"this is not a PNG")
    good = (folder / "train" / "class_1" / "000.png").read_bytes()
    bad[1].write_bytes(good[: len(good) // 2])  # truncated
    return bad


def test_unreadable_images_are_counted_and_reported_or_fail(tmp_path):
    folder = make_folder(tmp_path / "imgs", {"train": 6, "val": 2})
    bad = _break(folder)
    cfg = stream_config(folder, tmp_path / "skip", epochs=1)
    with pytest.warns(RuntimeWarning, match=r"skipped 2 unreadable image\(s\).*zz_"):
        result = train(cfg)
    assert result.history[0]["bad_images"] == 2
    assert load_model(result.model_path)[1]["bad_images"] == 2
    with pytest.raises(UnreadableImageError, match=r"bad_images='fail': 1 unreadable image.*zz_"):
        train(replace(cfg, bad_images="fail", out_dir=str(tmp_path / "fail")))
    # the in-memory loader: skipped with a warning naming them, or a clear failure
    with pytest.warns(RuntimeWarning, match=r"skipped 2 unreadable image\(s\)"):
        mem = load_image_folder(folder / "train", image_size=8, fractions=(0.5, 0.25, 0.25))
    assert sum(mem.sizes().values()) == 12
    with pytest.raises(UnreadableImageError, match=str(bad[0].name)):
        load_image_folder(folder / "train", image_size=8, bad_images="fail")


def test_tar_shards_train_with_epoch_resume(tmp_path):
    root = tmp_path / "wds"
    make_shards(root, "train", [7, 9, 5])
    make_shards(root, "val", [6])
    data = open_tar_shards(root)
    assert data.sizes() == {"train": 21, "val": 6, "test": 6}
    assert data.num_classes == 2
    assert tar_steps(data.train, 4, 1) == 5
    assert tar_steps(data.train, 4, 2) == 2  # rank 0: 7 + 5 = 12 samples, rank 1: 9
    cfg = stream_config(root, tmp_path / "run", data="webdataset", loader="auto", num_workers=2)
    result = train(cfg)
    assert [h["step"] for h in result.history] == [2, 4]  # 21 samples, batch 8, drop the rest
    assert 0.0 <= result.history[-1]["val_acc"][-1] <= 1.0
    # resume from the end of epoch 1 (tar runs checkpoint per epoch): the same weights
    cut = tmp_path / "cut"
    train(replace(cfg, out_dir=str(cut)))
    for f in (cut / "checkpoints").glob("step-00000004.*"):
        f.unlink()
    train(replace(cfg, out_dir=str(cut), resume=True))
    want = _weights(tmp_path / "run")
    for key, value in _weights(cut).items():
        assert torch.equal(value, want[key]), key
    with pytest.raises(
        ValueError,
        match=r"batch_size: 10 per process but a process.s shards hold only 9 samples: lower batch_size",
    ):
        tar_steps(data.train, 10, 2)
    with pytest.raises(FileNotFoundError, match=r"holds no .tar shards"):
        open_tar_shards(tmp_path)


def test_streamed_ddp_matches_one_process(tmp_path):
    """Two gloo processes under torchrun, each decoding its shard of every batch, follow the
    one-process trajectory (an MLP: no BatchNorm statistics per process)."""
    folder = make_folder(tmp_path / "imgs", {"train": 10, "val": 3}, side=28, gray=True)
    args = [
        "train", "--data", "folder", "--data-root", str(folder), "--loader", "stream",
        "--grayscale", "--image-size", "28", "--augment", "flip", "--backbone", "mlp",
        "--backbone-width", "16", "--embed-dim", "8", "--epochs", "1", "--batch-size", "6",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for name, launcher in (
        ("one", [sys.executable, "-m", "matryoshka.cli"]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "matryoshka.cli"]),
    ):  # fmt: skip
        out = tmp_path / name
        proc = subprocess.run(
            [*launcher, *args, "--out-dir", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(_weights(out))
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_schedules_and_progressive_resizing():
    assert [progressive_size(e, [160, 192, 29, 34], 224) for e in (0, 29, 31, 32, 34, 39)] == [
        160, 160, 160, 192, 192, 192,
    ]  # fmt: skip
    assert progressive_size(5, None, 64) == 64
    cfg = TrainConfig(schedule="triangular", lr=1.0, epochs=4, lr_peak_epoch=1, progress=False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch=2)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4, 0.50005, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loader": "disk"}, r"loader='disk' is not one of \['auto', 'memory', 'stream'\]"),
        ({"augment": "mixup"}, r"augment='mixup' is not one of \['none', 'flip', 'crop-flip'\]"),
        ({"bad_images": "ignore"}, r"bad_images='ignore' is not one of \['skip', 'fail'\]"),
        ({"optimizer": "lamb"}, r"optimizer='lamb' is not one of \['adamw', 'sgd'\]"),
        ({"schedule": "step"}, r"schedule='step' is not one of \['cosine', 'triangular'\]"),
        ({"num_workers": -1}, r"num_workers=-1 must be an int >= 0"),
        ({"loader": "stream"}, r"loader='stream' reads image files but data='mnist-subset'"),
        ({"data": "webdataset", "loader": "memory"}, r"loader='memory' but data='webdataset'"),
        (
            {"data": "webdataset", "checkpoint_every": 10},
            r"checkpoint_every=10 but data='webdataset' resumes at epoch boundaries only",
        ),
        ({"val_crop_ratio": 1.5}, r"val_crop_ratio=1.5 must be in \(0, 1\]"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
        (
            {"schedule": "triangular", "epochs": 1, "lr_peak_epoch": 2.0},
            r"lr_peak_epoch=2.0 must be in \[0, epochs=1\]",
        ),
        (
            {"progressive_resize": [192, 160, 0, 1]},
            r"progressive_resize=\[192, 160, 0, 1\] must be",
        ),
    ],
)
def test_streaming_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_stream_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_root='.*nope' is not a folder"):
        open_folder(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no images"):
        open_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"pretrained='w.pt' but backbone='cnn_tiny' takes no"):
        train(replace(stream_config(tmp_path, tmp_path / "o"), pretrained="w.pt"))


def test_imagenet_recipe_is_valid_and_runs_two_steps_on_a_tiny_folder(tmp_path):
    path = ROOT / "configs" / "imagenet_resnet50_mrl.yaml"
    cfg = load_recipe(TrainConfig, path)
    assert cfg.backbone == "resnet50"
    assert cfg.embed_dim == 2048
    assert list(cfg.nesting_obj()) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert (cfg.optimizer, cfg.schedule, cfg.label_smoothing) == ("sgd", "triangular", 0.1)
    assert cfg.progressive_resize == [160, 192, 29, 34]
    assert cfg.streams()
    folder = make_folder(tmp_path / "imgs", {"train": 4, "val": 2}, side=40)
    tiny = load_recipe(
        TrainConfig,
        path,
        overrides={
            "data_root": str(folder), "out_dir": str(tmp_path / "run"), "device": "cpu",
            "epochs": 2, "batch_size": 8, "num_workers": 0, "image_size": 32,
            "progressive_resize": [32, 64, 0, 1], "val_image_size": 32, "progress": False,
            "checkpoint_every": 0,
        },
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no unreadable images
        result = train(tiny)
    assert [h["step"] for h in result.history] == [1, 2]  # 8 images, batch 8: one step an epoch
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert load_model(result.model_path)[1]["input_shape"] == [3, 64, 64]
