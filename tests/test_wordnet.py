"""WordNet loader, seeded splits and tasks: on the real Debian files, and on tiny hand-made ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matryoshka.data.wordnet import (
    LEXNAMES,
    POS_NAMES,
    Synset,
    definition_to_lemmas,
    example_to_definition,
    lemmas_to_definition,
    lexname_task,
    load_synsets,
    mask_example,
    split_synsets,
)
from tests.markers import needs_wordnet

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUN = (
    "00000001 05 n 02 dog 0 domestic_dog 0 001 @ 00000002 n 0000 "
    '| a domesticated canid; "the dog barked all night"  \n'
    "00000002 05 n 01 canine 0 000 | a carnivore  \n"
    "00000003 18 n 01 dog 1 000 | a dull unattractive person  \n"
)
VERB = (
    "00000001 38 v 01 run 0 001 @ 00000009 v 0000 01 + 02 00 "
    '| move fast on foot; "He ran to the store"; "run home"  \n'
)
ADJ = "00000001 00 s 02 handy 0 ready_to_hand(p) 0 001 & 00000005 a 0000 | easy to reach  \n"
ADV = "00000001 02 r 01 fast 0 000 | quickly  \n"


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    for name, body in {"noun": NOUN, "verb": VERB, "adj": ADJ, "adv": ADV}.items():
        (tmp_path / f"data.{name}").write_text(HEADER + body)
    return tmp_path


def test_parse_tiny_files(tiny_root: Path) -> None:
    synsets = load_synsets(tiny_root)
    assert [s.id for s in synsets] == [
        "00000001-n",
        "00000002-n",
        "00000003-n",
        "00000001-v",
        "00000001-a",
        "00000001-r",
    ]
    dog = synsets[0]
    assert dog.lemmas == ("dog", "domestic dog")
    assert dog.lexname == "noun.animal"
    assert dog.definition == "a domesticated canid"
    assert dog.examples == ("the dog barked all night",)
    assert dog.hypernyms == ("00000002-n",)
    assert dog.lemma_text == "dog, domestic dog"
    run = synsets[3]
    assert run.lexname == "verb.motion"
    assert run.examples == ("He ran to the store", "run home")
    assert run.hypernyms == ("00000009-v",)
    handy = synsets[4]
    assert handy.pos == "a"
    assert handy.lemmas == ("handy", "ready to hand")  # "(p)" marker stripped
    assert handy.hypernyms == ()  # "&" (similar to) is not a hypernym


def test_missing_folder_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        load_synsets(tmp_path / "nope")
    (tmp_path / "data.noun").write_text(NOUN)
    with pytest.raises(FileNotFoundError, match=r"no data\.verb.*wordnet-base"):
        load_synsets(tmp_path)


def test_malformed_line_is_reported(tiny_root: Path) -> None:
    (tiny_root / "data.adv").write_text("00000001 02 r 05 fast 0 000 | quickly\n")
    with pytest.raises(ValueError, match=r"data\.adv:1 is not a wndb\(5\) synset line"):
        load_synsets(tiny_root)


@needs_wordnet
def test_real_wordnet_counts_and_structure(wordnet: list[Synset]) -> None:
    assert len(wordnet) == 117_659
    assert {s.lexname for s in wordnet} == set(LEXNAMES)
    assert {s.pos for s in wordnet} == set(POS_NAMES)
    by_id = {s.id: s for s in wordnet}
    assert len(by_id) == len(wordnet)
    dog = by_id["02084071-n"]
    assert dog.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert dog.lexname == "noun.animal"
    assert dog.examples == ("the dog barked all night",)
    assert "02083346-n" in dog.hypernyms  # canine
    # every hypernym pointer resolves, and stays within the same part of speech
    assert all(h in by_id and h[-1] == s.pos for s in wordnet for h in s.hypernyms)
    assert 30_000 < sum(1 for s in wordnet if s.examples) < 36_000


def _fake(n: int) -> list[Synset]:
    return [Synset(f"{i:08d}-n", "n", "noun.act", (f"w{i}",), f"def {i}", (), ()) for i in range(n)]


def test_split_is_seeded_disjoint_and_order_independent() -> None:
    synsets = _fake(1000)
    a = split_synsets(synsets, seed=3, fractions={"train": 0.7, "test": 0.2})
    assert [len(v) for v in a.values()] == [700, 200]
    ids = [{s.id for s in v} for v in a.values()]
    assert not ids[0] & ids[1]
    b = split_synsets(synsets[::-1], seed=3, fractions={"train": 0.7, "test": 0.2})
    assert {s.id for s in b["test"]} == ids[1]
    c = split_synsets(synsets, seed=4, fractions={"train": 0.7, "test": 0.2})
    assert {s.id for s in c["test"]} != ids[1]
    default = split_synsets(synsets, seed=0)
    assert sorted(default) == ["test", "train", "val"]
    assert sum(len(v) for v in default.values()) == 1000


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match=r"fractions\['a'\]=0.0 must be in \(0, 1\]"):
        split_synsets(_fake(10), 0, {"a": 0.0})
    with pytest.raises(ValueError, match=r"sum to 1\.2 > 1"):
        split_synsets(_fake(10), 0, {"a": 0.6, "b": 0.6})
    with pytest.raises(ValueError, match="is empty"):
        split_synsets(_fake(10), 0, {})


def test_retrieval_tasks_on_tiny_files(tiny_root: Path) -> None:
    synsets = load_synsets(tiny_root)
    t = definition_to_lemmas(synsets)
    assert t.queries[0] == "a domesticated canid"
    assert t.corpus[0] == "dog, domestic dog"
    assert t.relevant[0] == (0,)
    assert t.relevant[2] == (2,)  # "dog" (person) is its own document
    r = lemmas_to_definition(synsets)
    assert len(r.queries) == len(set(r.queries)) == len(synsets)
    e = example_to_definition(synsets)
    # "run": the first example ("He ran ...") has no lemma match, the second one does
    assert e.queries == ("the ___ barked all night", "___ home")
    assert e.relevant == ((0,), (3,))
    assert e.query_ids == ("00000001-n", "00000001-v")
    rel = t.relevance(np.array([[0, 1], [0, 1], [2, 0], [3, 4], [4, 5], [5, 0]]))
    assert rel[:, 0].tolist() == [True, False, True, True, True, True]
    np.testing.assert_array_equal(t.n_relevant(), np.ones(6))
    with pytest.raises(ValueError, match=r"ranked.shape=\(2, 2\) but the task has 6 queries"):
        t.relevance(np.zeros((2, 2), dtype=np.int64))


def test_duplicate_texts_are_all_relevant() -> None:
    synsets = [
        Synset("00000001-n", "n", "noun.act", ("bank",), "a slope", (), ()),
        Synset("00000002-n", "n", "noun.group", ("bank",), "an institution", (), ()),
        Synset("00000003-n", "n", "noun.act", ("shore",), "a slope", (), ()),
    ]
    t = definition_to_lemmas(synsets)
    assert t.relevant == ((0, 1), (0, 1), (2,))
    r = lemmas_to_definition(synsets)
    assert r.queries == ("bank", "shore")
    assert r.relevant == ((0, 1), (2,))


def test_mask_example() -> None:
    assert mask_example("The dog barked", ["dog"]) == "The ___ barked"
    assert mask_example("we were dancing", ["dance"]) == "we were ___"
    assert mask_example("a domestic dog", ["dog", "domestic dog"]) == "a ___"
    assert mask_example("nothing here", ["dog"]) is None


def test_task_errors() -> None:
    with pytest.raises(ValueError, match="synsets is empty"):
        definition_to_lemmas([])
    with pytest.raises(ValueError, match="no usage example"):
        example_to_definition(_fake(3))


@needs_wordnet
def test_lexname_task_on_real_split(wordnet: list[Synset]) -> None:
    test = split_synsets(wordnet, seed=0, fractions={"test": 0.02})["test"]
    task = lexname_task(test)
    assert task.labels.shape == task.coarse_labels.shape == (len(test),)
    assert task.label_names == LEXNAMES
    assert len(LEXNAMES) == 45
    for s, y, c in zip(test[:50], task.labels[:50], task.coarse_labels[:50], strict=True):
        assert LEXNAMES[y] == s.lexname
        assert POS_NAMES[c] == s.pos
        assert s.lexname.split(".")[0] == {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}[s.pos]
    ex = example_to_definition(test)
    assert 300 < len(ex.queries) < len(test)
    assert all("___" in q for q in ex.queries)
