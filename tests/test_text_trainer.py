"""`mrl train` for text inside SentenceTransformerTrainer: own pairs, the saved folder, resuming.

A 1-layer MiniLM (384-d, 24 tokens) and 16 generated pairs keep each run to a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from matryoshka.training.text import CHECKPOINTS, TextTrainConfig, latest_checkpoint, train_text
from tests.markers import needs_text
from tests.text_data import tiny_model, write_beir, write_pairs

pytestmark = [needs_text, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    import torch

    torch.set_num_threads(1)
    return tiny_model(tmp_path_factory.mktemp("tiny-minilm"))


def _config(tmp_path: Path, model: str, **kw: Any) -> TextTrainConfig:
    values: dict[str, Any] = {
        "model": model,
        "data": str(write_pairs(tmp_path / "pairs.jsonl", ("query", "doc"), negatives=True)),
        "columns": ["query", "doc", "negative"],
        "sizes": [32, 128, 384],
        "batch_size": 8,
        "lr": 1e-4,
        "out_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        **kw,
    }
    return TextTrainConfig.from_dict(values)


def test_own_pairs_train_in_the_trainer_and_save_a_plain_model(tmp_path: Path, tiny: str) -> None:
    beir = write_beir(tmp_path / "beir", ("dev",))
    out = train_text(_config(tmp_path, tiny, eval_data=str(beir), n_sizes_per_step=2))
    meta = json.loads((out / "text_model.json").read_text())
    assert meta["trainer"] == "sentence_transformers.SentenceTransformerTrainer"
    assert meta["sizes"] == [32, 128, 384]
    assert meta["loss"]["name"] == "FusedMatryoshkaLoss"
    assert meta["loss"]["matryoshka_dims"] == [384, 128, 32]
    assert meta["loss"]["n_dims_per_step"] == 2
    assert meta["loss"]["scale"] == pytest.approx(20.0)  # 1 / temperature
    assert meta["data"]["rows"] == meta["train_pairs"] == 16
    assert meta["steps"] == 2  # 16 pairs, 8 a step, one epoch
    assert meta["bf16"] is False  # never on CPU
    assert meta["base_model_path"] == str(Path(tiny).resolve())
    for m in (32, 128, 384):  # the per-size evaluator (truncate_dim) ran on the dev split
        assert 0.0 <= meta["eval"][f"dim_{m}_cosine_ndcg@10"] <= 1.0
    assert not (out / CHECKPOINTS).exists()  # finished: only model/ is kept
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

    card = (out / "model" / "README.md").read_text()
    assert "FusedMatryoshkaLoss" in card
    assert "Matryoshka sizes 32, 128, 384" in card
    assert '"matryoshka_dims": [\n' in card  # the loss's parameters, as the trainer lists them

    # Plain sentence-transformers loads it: no matryoshka import anywhere in the process.
    code = (
        "import sys; from sentence_transformers import SentenceTransformer\n"
        f"m = SentenceTransformer({str(out / 'model')!r}, device='cpu')\n"
        "e = m.encode(['a cat', 'a dog'], truncate_dim=32)\n"
        "assert e.shape == (2, 32), e.shape\n"
        "assert not any(k.startswith('matryoshka') for k in sys.modules), 'imported matryoshka'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_an_interrupted_run_resumes_from_its_newest_complete_checkpoint(
    tmp_path: Path, tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import TrainerCallback

    import matryoshka.training.text as text

    class Interrupt(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 2:
                raise KeyboardInterrupt  # as if the job were killed right after checkpoint-2

    real = text._run_trainer

    def interrupted(*args: Any, **kw: Any) -> Any:
        from sentence_transformers import SentenceTransformerTrainer

        original = SentenceTransformerTrainer.__init__

        def init(self: Any, *a: Any, **k: Any) -> None:
            original(self, *a, **k)
            self.add_callback(Interrupt())

        monkeypatch.setattr(SentenceTransformerTrainer, "__init__", init)
        try:
            return real(*args, **kw)
        finally:
            monkeypatch.setattr(SentenceTransformerTrainer, "__init__", original)

    config = _config(tmp_path, tiny, epochs=2, checkpoint_every=1)  # 4 steps in all
    monkeypatch.setattr(text, "_run_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_text(config)
    monkeypatch.setattr(text, "_run_trainer", real)
    out = Path(config.out_dir)
    assert not (out / "model").exists()
    assert not (out / "text_model.json").exists()
    ckpt = out / CHECKPOINTS
    assert latest_checkpoint(ckpt) == ckpt / "checkpoint-2"
    (ckpt / "checkpoint-3").mkdir()  # cut short before trainer_state.json: never resumed from
    (ckpt / "checkpoint-3" / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(ckpt) == ckpt / "checkpoint-2"

    with pytest.raises(ValueError, match=r"holds checkpoints of an unfinished run.*pass --resume"):
        train_text(config)
    resumed = train_text(TextTrainConfig.from_dict({**vars(config), "resume": True}))
    meta = json.loads((resumed / "text_model.json").read_text())
    assert meta["resumed_from"] == str(ckpt / "checkpoint-2")
    assert meta["steps"] == 4
    assert not ckpt.exists()
    with pytest.raises(ValueError, match=r"has no complete checkpoint.*the run there has finished"):
        train_text(TextTrainConfig.from_dict({**vars(config), "resume": True}))


def test_a_2d_recipe_refuses_resume_and_hard_negatives(tmp_path: Path, tiny: str) -> None:
    with pytest.raises(ValueError, match="resume=True with layers: the 2D loop writes no"):
        train_text(_config(tmp_path, tiny, layers=[0], resume=True))
    with pytest.raises(ValueError, match=r"has hard negatives \(\['negative'\]\) but the 2D"):
        train_text(_config(tmp_path, tiny, layers=[0]))
    out = train_text(_config(tmp_path, tiny, layers=[0], columns=["query", "doc"]))
    meta = json.loads((out / "text_model.json").read_text())
    assert meta["loss"]["name"] == "Matryoshka2dContrastiveLoss"
    assert "Matryoshka2dContrastiveLoss" in (out / "model" / "README.md").read_text()
