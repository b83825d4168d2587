"""Adaptive deployment: use the smallest prefix that does the job, per input.

* :class:`AdaptiveClassifier`: a confidence cascade over the nesting ladder (classify.py).
* :class:`FunnelRetriever` / :class:`FunnelTuner`: shortlist with a short prefix from an index,
  rerank with longer prefixes read from a memory-mapped matrix (retrieve.py).
"""

from matryoshka.adaptive.classify import (
    AdaptiveClassifier,
    cascade_curve,
    cascade_stages,
    confidence_scores,
    fit_thresholds,
    head_flops,
)
from matryoshka.adaptive.retrieve import (
    FunnelRetriever,
    FunnelTuner,
    open_corpus,
    recall_vs_reference,
)

__all__ = [
    "AdaptiveClassifier",
    "FunnelRetriever",
    "FunnelTuner",
    "cascade_curve",
    "cascade_stages",
    "confidence_scores",
    "fit_thresholds",
    "head_flops",
    "open_corpus",
    "recall_vs_reference",
]
