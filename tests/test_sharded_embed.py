"""Sharded ``mrl embed --shard I/N`` + ``mrl embed-merge``: shards written by separate calls
merge into exactly the unsharded array; every broken set of shards is refused by name."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from matryoshka.cli import main
from matryoshka.embed.shards import merge_shards, parse_shard, shard_path, shard_rows
from matryoshka.retrieval.index import load_index
from tests.markers import HAS_TEXT, needs_text

TEXTS = [
    "a domesticated canid",
    "a large body of water",
    "move fast on foot",
    "quickly",
    "a small feline kept as a pet",
    "frozen water falling as flakes",
    "the star at the centre of the solar system",
    "a vehicle with two wheels driven by pedals",
    "a building where books are kept",
    "to prepare food by heating it",
    "a musical instrument with black and white keys",
    "the season after summer",
    "a person who teaches at a school",
    "a sweet yellow fruit with a thick skin",
]  # 14 rows: blocks of 4, 5, 5 for 3 shards


@dataclass
class Corpus:
    texts: Path
    single: Path  # unsharded `mrl embed --out single.npy`
    shards: Path  # folder of 3 shards from 3 separate `mrl embed --shard I/3` calls
    common: list[str]  # the options every call shares


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    if not HAS_TEXT:
        pytest.skip("needs the text extra: pip install 'matryoshka[text]'")
    root = tmp_path_factory.mktemp("sharded")
    texts = root / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    common = ["--input", str(texts), "--dim", "32", "--cache-dir", str(root / "cache"), "--quiet"]
    single, shards = root / "single.npy", root / "shards"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for a module-scoped fixture
    try:
        with threadpool_limits(limits=1):
            assert main(["embed", *common, "--out", str(single)]) == 0
            for i in range(3):
                assert main(["embed", *common, "--shard", f"{i}/3", "--out", str(shards)]) == 0
    finally:
        torch.set_num_threads(before)
    return Corpus(texts, single, shards, common)


pytestmark = [needs_text, pytest.mark.usefixtures("one_thread")]


def copy_shards(corpus: Corpus, tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    shutil.copytree(corpus.shards, folder)
    return folder


def merge_error(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``mrl embed-merge`` expecting exit status 2; return its message."""
    capsys.readouterr()
    assert main(["embed-merge", str(folder), "--out", str(tmp_path / "merged.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrl: error: ")
    assert not (tmp_path / "merged.npy").exists()  # nothing written on a refused merge
    return err


def test_parse_shard_and_rows() -> None:
    assert parse_shard("2/3") == (2, 3)
    assert parse_shard("auto", {"RANK": "5", "WORLD_SIZE": "8"}) == (5, 8)
    for bad, match in [("3/3", "0 <= I < N"), ("0/0", "0 <= I < N"), ("1-3", "is not I/N")]:
        with pytest.raises(ValueError, match=match):
            parse_shard(bad)
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        parse_shard("auto", {})
    for n in (0, 1, 2, 14, 101):
        for count in (1, 3, 7, 20):
            blocks = [shard_rows(n, i, count) for i in range(count)]
            assert blocks[0][0] == 0
            assert blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_three_shards_merge_into_the_unsharded_array(
    corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_shards(corpus, tmp_path)
    metas = [
        json.loads(shard_path(folder, i, 3).with_suffix(".json").read_text()) for i in (0, 1, 2)
    ]
    assert [(m["row_start"], m["row_stop"], m["count"]) for m in metas] == [
        (0, 4, 4),
        (4, 9, 5),
        (9, 14, 5),
    ]
    assert {(m["model"], m["size"], m["num_shards"], m["total_rows"]) for m in metas} == {
        ("all-MiniLM-L6-v2", 32, 3, 14)
    }

    merged = tmp_path / "corpus.npy"
    capsys.readouterr()
    assert main(["embed-merge", str(folder), "--out", str(merged)]) == 0
    assert "14 x 32" in capsys.readouterr().out
    single = np.load(corpus.single)
    got = np.load(merged)
    assert got.shape == single.shape == (14, 32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, single, rtol=0, atol=1e-6)
    sidecar = json.loads(merged.with_suffix(".json").read_text())
    assert sidecar.pop("manifest") == str(folder / "manifest.json")
    assert sidecar == json.loads(corpus.single.with_suffix(".json").read_text())

    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["num_shards"], manifest["rows"], manifest["size"]) == (3, 14, 32)
    assert manifest["model"] == "all-MiniLM-L6-v2"
    assert [s["sha256"] for s in manifest["shards"]] == [m["sha256"] for m in metas]
    assert manifest["merged"]["shape"] == [14, 32]

    for name, emb in (("single", corpus.single), ("merged", merged)):
        out = tmp_path / f"{name}.index"
        assert main(["index", "build", str(emb), "--dim", "16", "--out", str(out), "--quiet"]) == 0
    q = single[[0, 5, 13]]
    s1, i1 = load_index(tmp_path / "single.index").search(q, 5)
    s2, i2 = load_index(tmp_path / "merged.index").search(q, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert list(i2[:, 0]) == [0, 5, 13]  # ids are the original row numbers


def test_shard_auto_reads_torchrun_env(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "auto"
    assert main(["embed", *corpus.common, "--shard", "auto", "--out", str(out)]) == 0
    assert [p.name for p in sorted(out.iterdir())] == [
        "shard-00001-of-00003.json",
        "shard-00001-of-00003.npy",
    ]
    np.testing.assert_array_equal(
        np.load(shard_path(out, 1, 3)), np.load(shard_path(corpus.shards, 1, 3))
    )


def test_more_shards_than_rows(corpus: Corpus, tmp_path: Path) -> None:
    texts = tmp_path / "three.txt"
    texts.write_text("\n".join(TEXTS[:3]) + "\n")
    opts = ["--input", str(texts), "--dim", "32", "--no-cache", "--quiet"]
    for i in range(5):  # two of the five blocks are empty
        assert main(["embed", *opts, "--shard", f"{i}/5", "--out", str(tmp_path / "s")]) == 0
    merge_shards(tmp_path / "s", tmp_path / "m.npy")
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), np.load(corpus.single)[:3], atol=1e-6)


def test_bad_shard_options(
    corpus: Corpus,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for shard, out, match in [
        ("0/3", "x.npy", "with --shard, --out is a folder"),
        ("3/3", "s", "0 <= I < N"),
        ("auto", "s", "RANK and WORLD_SIZE"),
    ]:
        argv = ["embed", *corpus.common, "--shard", shard, "--out", str(tmp_path / out)]
        assert main(argv) == 2
        assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_shard(corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_shards(corpus, tmp_path)
    shard_path(folder, 1, 3).with_suffix(".json").unlink()
    shard_path(folder, 1, 3).unlink()
    err = merge_error(folder, tmp_path, capsys)
    assert "shard 1 of 3" in err
    assert "shard-00001-of-00003.npy) is missing" in err
    assert "--shard 1/3 --out" in err  # the fix
    with pytest.raises(ValueError, match=r"shard 1 of 3 .* is missing"):
        merge_shards(folder, tmp_path / "m.npy")
    shard_path(folder, 2, 3).with_suffix(".json").unlink()
    with pytest.raises(ValueError, match=r"2 shards are missing: \[1, 2\]"):
        merge_shards(folder, tmp_path / "m.npy")


def test_corrupted_shard(
    corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_shards(corpus, tmp_path)
    npy = shard_path(folder, 2, 3)
    data = bytearray(npy.read_bytes())
    data[-7] ^= 0x01  # one flipped bit in the last row
    npy.write_bytes(bytes(data))
    err = merge_error(folder, tmp_path, capsys)
    assert "shard 2" in err
    assert "fails its checksum" in err
    assert "--shard 2/3" in err
    npy.write_bytes(bytes(data[:-40]))  # torn: truncated
    with pytest.raises(ValueError, match=r"shard 2 .* fails its checksum"):
        merge_shards(folder, tmp_path / "m.npy")
    npy.with_suffix(".json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"shard 2 .* is not readable JSON"):
        merge_shards(folder, tmp_path / "m.npy")


def test_shards_of_different_sizes_or_models(
    corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_shards(corpus, tmp_path)
    argv = ["embed", *corpus.common, "--dim", "16", "--shard", "1/3", "--out", str(folder)]
    assert main(argv) == 0  # shard 1 re-run at another size (the later --dim wins)
    err = merge_error(folder, tmp_path, capsys)
    assert "shard 1" in err
    assert "size=16 but shard 0 has size=32" in err
    assert "--dim" in err

    folder = copy_shards(corpus, tmp_path / "b")
    meta_path = shard_path(folder, 2, 3).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["model"] = "other-model"  # as if shard 2 ran with --model other-model
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shard 2 .* model='other-model' but shard 0 has"):
        merge_shards(folder, tmp_path / "m.npy")


def test_shards_of_other_texts_or_another_split(corpus: Corpus, tmp_path: Path) -> None:
    folder = copy_shards(corpus, tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(TEXTS)) + "\n")
    opts = ["--input", str(other), "--dim", "32", "--no-cache", "--quiet"]
    assert main(["embed", *opts, "--shard", "0/3", "--out", str(folder)]) == 0
    with pytest.raises(ValueError, match=r"shard 1 .* texts_sha256=.* other texts"):
        merge_shards(folder, tmp_path / "m.npy")

    folder = copy_shards(corpus, tmp_path / "b")
    shutil.copy(shard_path(folder, 0, 3), folder / "shard-00000-of-00002.npy")
    shutil.copy(shard_path(folder, 0, 3).with_suffix(".json"), folder / "shard-00000-of-00002.json")
    with pytest.raises(ValueError, match=r"different N \[2, 3\]"):
        merge_shards(folder, tmp_path / "m.npy")
    with pytest.raises(ValueError, match="holds no shard"):
        merge_shards(tmp_path / "b", tmp_path / "m.npy")
