"""``mrl embed``, ``mrl adaptor fit`` and ``mrl text-eval`` through ``matryoshka.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from matryoshka.cli import main
from matryoshka.data.wordnet import wordnet_texts
from matryoshka.evaluation.text import TextEvalConfig
from matryoshka.models.adaptor import MatryoshkaAdaptor
from matryoshka.ops import truncate_numpy
from tests.helpers import clustered
from tests.markers import WORDNET, needs_text, needs_wordnet

RECIPE = Path(__file__).parent.parent / "configs" / "text_wordnet.yaml"
TEXTS = ["a domesticated canid", "a large body of water", "move fast on foot", "quickly"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> object:
    from matryoshka.models.text_encoder import TextEncoder

    return TextEncoder()


def blobs(n: int, d: int = 384, seed: int = 0) -> np.ndarray:
    """``(n, d)`` points around 8 random centres."""
    return clustered(n, d, seed, n_clusters=8, noise=0.5)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@needs_text
def test_embed_a_text_file_with_and_without_an_adaptor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoder: object
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    cache = str(tmp_path / "cache")
    out = tmp_path / "emb" / "e.npy"
    common = ["--input", str(texts), "--cache-dir", cache, "--quiet"]
    rc, stdout, _ = run(["embed", *common, "--dim", "32", "--out", str(out)], capsys)
    assert rc == 0
    assert "4 x 32" in stdout
    emb = np.load(out)
    assert emb.shape == (4, 32)
    assert emb.dtype == np.float32
    full = encoder.encode(TEXTS, progress=False)  # type: ignore[attr-defined]
    np.testing.assert_allclose(emb, truncate_numpy(full, 32, normalize=True), atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "all-MiniLM-L6-v2"
    assert (meta["size"], meta["full_size"], meta["count"]) == (32, 384, 4)
    assert meta["adaptor"] is None
    assert len(list(Path(cache).glob("*.safetensors"))) == 1  # full vectors cached once

    x = tmp_path / "x.npy"
    np.save(x, blobs(400))
    stem = tmp_path / "ad" / "adaptor"
    fit = ["adaptor", "fit", "--embeddings", str(x), "--sizes", "32", "384", "--out", str(stem)]
    fit += ["--epochs", "2", "--hidden", "16", "--batch-size", "200", "--quiet"]
    rc, stdout, _ = run(fit, capsys)
    assert rc == 0
    assert "fitted on 400 embeddings" in stdout
    assert stem.with_suffix(".json").is_file()
    assert stem.with_suffix(".safetensors").is_file()
    adaptor = MatryoshkaAdaptor.load(stem)
    assert list(adaptor.nesting) == [32, 384]
    assert len(adaptor.history_) == 2

    out2 = tmp_path / "e-ad.npy"
    argv = ["embed", *common, "--dim", "32", "--adaptor", str(stem), "--out", str(out2)]
    assert run(argv, capsys)[0] == 0
    np.testing.assert_allclose(np.load(out2), adaptor.transform(full, dim=32), atol=1e-5)
    assert json.loads(out2.with_suffix(".json").read_text())["adaptor"] == str(stem)


@needs_wordnet
@needs_text
def test_fit_and_embed_on_wordnet_share_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoder: object
) -> None:
    from matryoshka.data.wordnet import load_synsets, split_synsets

    cache = tmp_path / "cache"
    source = ["--wordnet", "lemmas", "--fraction", "0.0034", "--cache-dir", str(cache)]  # 400
    argv = ["adaptor", "fit", *source, "--sizes", "64", "384", "--epochs", "1", "--hidden", "16"]
    rc, stdout, _ = run([*argv, "--quiet", "--out", str(tmp_path / "wn")], capsys)
    assert rc == 0
    assert "fitted on 400 embeddings (wordnet:lemmas" in stdout
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 1
    out = tmp_path / "lemmas.npy"
    argv = ["embed", *source, "--dim", "64", "--adaptor", str(tmp_path / "wn.json"), "--quiet"]
    assert run([*argv, "--out", str(out)], capsys)[0] == 0
    assert sorted(cache.glob("*.safetensors")) == cached  # encoded once, reused
    emb = np.load(out)
    assert emb.shape == (400, 64)
    subset = split_synsets(load_synsets(WORDNET), 0, {"subset": 0.0034})["subset"]
    first = encoder.encode([s.lemma_text for s in subset[:5]], progress=False)  # type: ignore[attr-defined]
    adaptor = MatryoshkaAdaptor.load(tmp_path / "wn")
    np.testing.assert_allclose(emb[:5], adaptor.transform(first, dim=64), atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["count"] == 400
    assert meta["source"] == "wordnet:lemmas:fraction=0.0034:seed=0"


def test_adaptor_fit_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = tmp_path / "x.npy"
    np.save(x, blobs(50, d=32))
    base = ["adaptor", "fit", "--embeddings", str(x), "--out", str(tmp_path / "a"), "--quiet"]
    cases = {
        "does not exist": ["--sizes", "8", "32", "--embeddings", str(tmp_path / "none.npy")],
        r"--sizes: sizes=[16, 8, 32] is not sorted": ["--sizes", "16", "8", "32"],
        "ends at 64 but the embeddings have 32 dimensions: make the last size 32": [
            "--sizes",
            "8",
            "64",
        ],
        "gives 20 embeddings of 32 dimensions: fit the adaptor on at least 32": [
            "--sizes",
            "8",
            "32",
        ],
    }
    for message, extra in cases.items():
        if "gives 20" in message:
            np.save(x, blobs(20, d=32))
        rc, _, err = run([*base, *extra], capsys)
        assert rc == 2
        assert message in err, err
    np.save(x, np.arange(5.0))
    rc, _, err = run([*base, "--sizes", "8", "32"], capsys)
    assert rc == 2
    assert "holds a float64 array of shape (5,): pass an (N, d) float matrix" in err
    with pytest.raises(SystemExit):  # argparse: exactly one source
        main(["adaptor", "fit", "--sizes", "8", "--out", "a"])


def test_supervised_adaptor_fit_from_pair_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, q, d = tmp_path / "x.npy", tmp_path / "q.npy", tmp_path / "d.npy"
    np.save(x, blobs(64, d=32))
    np.save(q, blobs(40, d=32, seed=1))
    np.save(d, blobs(40, d=32, seed=2))
    stem = tmp_path / "sup"
    base = ["adaptor", "fit", "--embeddings", str(x), "--sizes", "8", "32", "--out", str(stem)]
    base += ["--epochs", "1", "--hidden", "8", "--batch-size", "16", "--quiet"]
    rc, _, err = run([*base, "--queries", str(q)], capsys)
    assert rc == 2
    assert "--queries and --documents go together" in err
    rc, _, err = run([*base, "--queries", str(q), "--documents", str(tmp_path / "no.npy")], capsys)
    assert rc == 2
    assert "--documents" in err
    assert "does not exist" in err
    rc, _, err = run([*base, "--reg", "-1", "--queries", str(q), "--documents", str(d)], capsys)
    assert rc == 2
    assert "reg=-1.0 must be a float >= 0" in err
    assert run([*base, "--reg", "0.5", "--queries", str(q), "--documents", str(d)], capsys)[0] == 0
    sup = MatryoshkaAdaptor.load(stem)
    assert sup.reg == 0.5
    plain = MatryoshkaAdaptor(sup.nesting, hidden=8, epochs=1, batch_size=16, reg=0.5)
    plain.progress = False
    plain.fit(np.load(x))
    # The pairs add the InfoNCE term: the supervised map differs from the unsupervised one.
    assert not np.allclose(sup.transform(np.load(x)), plain.transform(np.load(x)), atol=1e-4)


def test_orthogonal_adaptor_fit_from_the_cli_keeps_full_size_cosines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = tmp_path / "x.npy"
    np.save(x, blobs(96, d=32))
    stem = tmp_path / "rot"
    argv = ["adaptor", "fit", "--embeddings", str(x), "--sizes", "8", "32", "--out", str(stem)]
    assert (
        run([*argv, "--epochs", "2", "--batch-size", "32", "--orthogonal", "--quiet"], capsys)[0]
        == 0
    )
    rot = MatryoshkaAdaptor.load(stem)
    assert rot.orthogonal
    y, xn = rot.transform(np.load(x)), truncate_numpy(np.load(x), 32, normalize=True)
    np.testing.assert_allclose(y @ y.T, xn @ xn.T, atol=1e-5)


@needs_text
def test_embed_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = tmp_path / "t.txt"
    texts.write_text("one\n\nthree\n")
    out = str(tmp_path / "e.npy")
    cases = {
        f"--input {str(tmp_path / 'no.txt')!r} does not exist": [
            "--input",
            str(tmp_path / "no.txt"),
        ],
        "line 2 is empty: put one non-empty text on every line": ["--input", str(texts)],
    }
    for message, argv in cases.items():
        rc, _, err = run(["embed", *argv, "--out", out, "--no-cache"], capsys)
        assert rc == 2
        assert message in err, err
    texts.write_text("one\ntwo\n")
    cases = {
        "--dim 999 is larger than all-MiniLM-L6-v2's 384 dimensions": ["--dim", "999"],
        "--dim 0 must be a positive int": ["--dim", "0"],
        "--out 'e.txt' must end in .npy": ["--out", "e.txt"],
        "--fraction 2.0 must be in (0, 1]": ["--fraction", "2"],
        "adaptor.json is missing": ["--adaptor", str(tmp_path / "adaptor")],
    }
    for message, argv in cases.items():
        full = ["embed", "--input", str(texts), "--no-cache", "--quiet", "--out", out, *argv]
        rc, _, err = run(full, capsys)
        assert rc == 2
        assert message in err, err
    assert not Path(out).exists()


def test_recipe_is_a_text_eval_config() -> None:
    data = yaml.safe_load(RECIPE.read_text())
    assert "method" not in data  # not a TrainConfig recipe (tests/test_configs.py skips it)
    assert TextEvalConfig.from_dict(data) == TextEvalConfig()  # the recipe spells the defaults


def test_text_eval_config_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['method'\] for TextEvalConfig"):
        TextEvalConfig.from_dict({"method": "mrl"})
    with pytest.raises(ValueError, match=r"train_fraction=0 must be a share .* in \(0, 1\]"):
        TextEvalConfig(train_fraction=0)
    with pytest.raises(ValueError, match=r"\+ test_fraction=0.5 > 1: the splits must not"):
        TextEvalConfig(train_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="train_pairs=-1 must be an int >= 0"):
        TextEvalConfig(train_pairs=-1)
    with pytest.raises(ValueError, match="adaptor_epochs=0 must be an int >= 1"):
        TextEvalConfig(adaptor_epochs=0)
    with pytest.raises(ValueError, match=r"sizes=\[64, 32\] is not sorted"):
        TextEvalConfig(sizes=[64, 32])
    with pytest.raises(ValueError, match=r"adaptor_reg=-0\.5 must be a float >= 0\.0"):
        TextEvalConfig(adaptor_reg=-0.5)
    with pytest.raises(ValueError, match="probe_limit=5 must be an int >= 10"):
        TextEvalConfig(probe_limit=5)
    with pytest.raises(ValueError, match=r"what='glosses' \(--wordnet\) is not one of"):
        wordnet_texts("glosses")


@needs_wordnet
@needs_text
def test_text_eval_reads_a_recipe_and_flags_override_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shared_cache: Path
) -> None:
    recipe = tmp_path / "tiny.yaml"
    config = {
        "out_dir": str(tmp_path / "out"),
        "sizes": [32, 384],
        "train_fraction": 0.0017,  # 200 synsets: 400 rows for the adaptor
        "test_fraction": 0.0003,  # 35 synsets
        "train_pairs": 50,
        "adaptor_epochs": 1,
        "cache_dir": str(shared_cache),
        "ood_test_size": 20,
        "progress": False,
    }
    recipe.write_text(yaml.safe_dump(config))
    rc, stdout, _ = run(["text-eval", "--config", str(recipe), "--train-pairs", "0"], capsys)
    assert rc == 0
    assert stdout.startswith("ndcg@10\n")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["sizes"] == [32, 384]
    assert res["meta"]["train_pairs"] == 0  # the flag won over the recipe's 50
    assert res["meta"]["queries"] == 35
    assert set(res["metrics"]["ndcg@10"]) == {
        "base truncated",
        "base + PCA",
        "base + adaptor",
        "base + adaptor (supervised)",
    }
    assert (tmp_path / "out" / "report.md").is_file()

    cases = {
        "--config 'nope.yaml' does not exist": ["--config", "nope.yaml"],
        "train_fraction=1.5 must be a share": ["--train-fraction", "1.5"],
        "sizes=[8, 64] ends at 64": ["--config", str(recipe), "--sizes", "8", "64"],
    }
    recipe_bad = tmp_path / "bad.yaml"
    recipe_bad.write_text("- a list\n")
    cases["must hold a mapping of text-eval options"] = ["--config", str(recipe_bad)]
    for message, argv in cases.items():
        rc, _, err = run(["text-eval", *argv], capsys)
        assert rc == 2
        assert message in err, err
