"""Adaptive classification: a cascade over the nesting ladder, smallest prefix first.

Each input is classified with the smallest size ``m_1``; if the confidence (max softmax
probability, or the margin between the top two) is below that size's threshold, it moves on to
the next size, and so on; the largest size always answers. Thresholds are fitted on a validation
split to reach a target accuracy (by default, within ``tolerance`` of the full-size head) with
the lowest expected dimension (Kusupati et al. 2022, §4.2).

Cost accounting: the *expected dimension* is the mean size at which inputs are decided (the
paper's measure). The head FLOPs of an input decided at stage ``l`` are ``2·m_l·C`` for a tied
head (MRL-E: logits of size ``m_l`` extend those of ``m_{l-1}`` by one chunk) and
``2·C·(m_1 + ... + m_l)`` for independent heads (MRL: every visited head is evaluated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from matryoshka._validate import check_nesting
from matryoshka.models.heads import MatryoshkaHead
from matryoshka.nesting import Nesting

__all__ = [
    "CONFIDENCES",
    "AdaptiveClassifier",
    "cascade_curve",
    "cascade_stages",
    "confidence_scores",
    "fit_thresholds",
    "head_flops",
]

CONFIDENCES = ("max_softmax", "margin")
LogitsFn = Callable[[Any, int], Any]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def confidence_scores(logits: np.ndarray, kind: str = "max_softmax") -> np.ndarray:
    """Confidence of each prediction: ``(..., C) -> (...)``.

    ``max_softmax``: the largest softmax probability; ``margin``: top-1 minus top-2 probability.
    """
    if kind not in CONFIDENCES:
        raise ValueError(f"confidence={kind!r} is not known: use one of {list(CONFIDENCES)}.")
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if kind == "max_softmax":
        return p.max(-1)
    if p.shape[-1] < 2:
        return np.ones(p.shape[:-1], p.dtype)
    top2 = np.partition(p, p.shape[-1] - 2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def cascade_stages(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Stage at which each input is decided: ``(L, B), (L,) -> (B,)`` ints in ``[0, L)``.

    Input ``b`` stops at the first ``l`` with ``conf[l, b] >= thresholds[l]``; the last stage
    always accepts.
    """
    accept = conf >= thresholds[:, None]  # (L, B)
    accept[-1] = True
    return accept.argmax(0)


def head_flops(nesting: Nesting, num_classes: int, tied: bool) -> np.ndarray:
    """Multiply-add FLOPs of the head for an input decided at each stage: ``(L,)``.

    Tied (MRL-E): ``2·m_l·C``, later stages extend earlier logits. Untied (MRL): every visited
    head runs, ``2·C·sum_{j<=l} m_j``.
    """
    sizes = np.asarray(nesting.sizes, dtype=np.float64)
    per_stage = sizes if tied else np.cumsum(sizes)
    return 2.0 * num_classes * per_stage


def fit_thresholds(conf: np.ndarray, correct: np.ndarray, target_accuracy: float) -> np.ndarray:
    """Per-stage confidence thresholds reaching ``target_accuracy`` with few large stages.

    ``conf`` and ``correct`` are ``(L, B)`` (confidence and correctness of every size on the
    validation inputs). Greedy from the smallest size: each stage accepts as many inputs as it
    can (the lowest threshold) while the cascade's accuracy, counting every input not yet decided
    as answered by the largest size, stays ``>= target_accuracy``. Exact per stage: candidates
    are sorted by confidence and accuracies of all cut points come from cumulative sums.
    Returns ``(L,)`` thresholds; the last is ``-inf`` (always accept), ``+inf`` means "never".
    """
    n_sizes, n = conf.shape
    thr = np.full(n_sizes, np.inf)
    thr[-1] = -np.inf
    correct = correct.astype(np.int64)
    need = target_accuracy * n - 1e-9
    undecided = np.ones(n, bool)
    decided_correct = 0
    for level in range(n_sizes - 1):
        r = np.flatnonzero(undecided)
        if r.size == 0:
            break
        order = r[np.argsort(-conf[level, r], kind="stable")]  # most confident first
        c_sorted = conf[level, order]
        gain = np.concatenate([[0], np.cumsum(correct[level, order])])  # accepted here
        full = np.concatenate([[0], np.cumsum(correct[-1, order])])
        acc = decided_correct + gain + (full[-1] - full)  # (|r|+1,), accepting the first j
        # A cut after j items is valid only between distinct confidences (threshold = c[j-1]).
        j_ok = np.ones(r.size + 1, bool)
        j_ok[1:-1] = c_sorted[1:] < c_sorted[:-1]
        ok = np.flatnonzero(j_ok & (acc >= need))
        if ok.size == 0 or ok[-1] == 0:
            continue  # this stage accepts nothing
        j = int(ok[-1])
        thr[level] = c_sorted[j - 1]
        accepted = order[:j]
        undecided[accepted] = False
        decided_correct += int(correct[level, accepted].sum())
    return thr


class AdaptiveClassifier:
    """A confidence cascade over a Matryoshka classifier's sizes (sklearn-style estimator).

    Args:
        model: a :class:`MatryoshkaHead` (called on ``(B, d)`` embeddings), or any callable
            ``logits_fn(x, m) -> (B, C)`` giving the size-``m`` logits of inputs ``x`` (tensor or
            array, indexable by a row-index array).
        nesting: the ladder the cascade walks (must be the model's when ``model`` is a head).
        target_accuracy: validation accuracy to reach; ``None`` means the full-size accuracy
            minus ``tolerance``.
        tolerance: allowed accuracy drop from the full size when ``target_accuracy`` is None.
        confidence: ``"max_softmax"`` or ``"margin"``.
        tied: whether later sizes reuse earlier logits (for FLOPs); ``None`` reads ``model.tied``
            for a head and assumes ``False`` otherwise.

    ``fit(x, y)`` sets ``thresholds_`` ``(L,)``, ``target_accuracy_``, ``full_accuracy_``,
    ``val_accuracy_``, ``val_expected_dim_``; ``predict(x, return_dims=True)`` also returns the
    size that decided each input.
    """

    def __init__(
        self,
        model: MatryoshkaHead | LogitsFn,
        nesting: Nesting,
        target_accuracy: float | None = None,
        tolerance: float = 0.005,
        confidence: str = "max_softmax",
        tied: bool | None = None,
    ) -> None:
        self.model = model
        self.nesting = nesting
        self.target_accuracy = target_accuracy
        self.tolerance = tolerance
        self.confidence = confidence
        self.tied = tied

    def _validate(self) -> None:
        check_nesting(self.nesting)
        if isinstance(self.model, MatryoshkaHead) and self.model.nesting != self.nesting:
            raise ValueError(
                f"nesting={self.nesting!r} differs from the head's {self.model.nesting!r}: "
                f"pass nesting=model.nesting."
            )
        if not callable(self.model):
            raise TypeError(
                f"model={self.model!r} must be a MatryoshkaHead or a callable logits_fn(x, m)."
            )
        if self.confidence not in CONFIDENCES:
            raise ValueError(
                f"confidence={self.confidence!r} is not known: use one of {list(CONFIDENCES)}."
            )
        if self.target_accuracy is not None and not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy={self.target_accuracy!r} must be in [0, 1].")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"tolerance={self.tolerance!r} must be in [0, 1], e.g. 0.005.")

    def _logits(self, x: Any, m: int) -> np.ndarray:
        """Size-``m`` logits ``(B, C)`` of inputs ``x``."""
        with torch.no_grad():
            if isinstance(self.model, MatryoshkaHead):
                z = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
                return _to_numpy(self.model.forward_size(z.float(), m))
            return _to_numpy(self.model(x, m))

    def all_logits(self, x: Any) -> np.ndarray:
        """Logits of every size: ``(B, ...) -> (L, B, C)`` (fused for a head)."""
        if isinstance(self.model, MatryoshkaHead):
            z = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
            with torch.no_grad():
                return _to_numpy(self.model(z.float()))
        return np.stack([self._logits(x, m) for m in self.nesting])

    @property
    def is_tied(self) -> bool:
        """Whether later sizes extend earlier logits (cost model of :func:`head_flops`)."""
        if self.tied is not None:
            return bool(self.tied)
        return bool(getattr(self.model, "tied", False))

    def fit(self, x: Any, y: Any) -> AdaptiveClassifier:
        """Fit the thresholds on validation inputs ``x`` (``B`` rows) and labels ``y`` ``(B,)``."""
        self._validate()
        logits = self.all_logits(x)  # (L, B, C)
        y = _to_numpy(y).astype(np.int64).reshape(-1)
        if y.shape[0] != logits.shape[1]:
            raise ValueError(
                f"y has {y.shape[0]} labels but x has {logits.shape[1]} inputs: give one label "
                f"per input."
            )
        if y.shape[0] == 0:
            raise ValueError("x is empty: fit needs at least one validation input.")
        conf = confidence_scores(logits, self.confidence)  # (L, B)
        correct = logits.argmax(-1) == y[None, :]  # (L, B)
        self.num_classes_ = int(logits.shape[-1])
        self.full_accuracy_ = float(correct[-1].mean())
        self.size_accuracies_ = correct.mean(1).tolist()
        target = self.target_accuracy
        if target is None:
            target = self.full_accuracy_ - self.tolerance
        self.target_accuracy_ = float(target)
        self.thresholds_ = fit_thresholds(conf, correct, self.target_accuracy_)
        stages = cascade_stages(conf, self.thresholds_)
        sizes = np.asarray(self.nesting.sizes)
        self.val_accuracy_ = float(correct[stages, np.arange(y.shape[0])].mean())
        self.val_expected_dim_ = float(sizes[stages].mean())
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "thresholds_"):
            raise RuntimeError(
                "This AdaptiveClassifier is not fitted yet: call fit(x_val, y_val) first."
            )

    def predict(self, x: Any, return_dims: bool = False) -> Any:
        """Cascade predictions ``(B,)`` int64; with ``return_dims`` also the deciding size ``(B,)``.

        Only the inputs still undecided are evaluated at each larger size.
        """
        self._check_fitted()
        n = len(x)
        pred = np.empty(n, np.int64)
        dims = np.empty(n, np.int64)
        todo = np.arange(n)
        last = len(self.nesting) - 1
        for level, m in enumerate(self.nesting):
            if todo.size == 0:
                break
            xs = x[torch.as_tensor(todo)] if isinstance(x, torch.Tensor) else x[todo]
            logits = self._logits(xs, m)  # (b, C)
            conf = confidence_scores(logits, self.confidence)  # (b,)
            done = np.ones(todo.size, bool) if level == last else conf >= self.thresholds_[level]
            pred[todo[done]] = logits[done].argmax(-1)
            dims[todo[done]] = m
            todo = todo[~done]
        return (pred, dims) if return_dims else pred

    def evaluate(self, x: Any, y: Any) -> dict[str, Any]:
        """Accuracy, expected dimension and mean head FLOPs of the cascade on ``(x, y)``."""
        pred, dims = self.predict(x, return_dims=True)
        y = _to_numpy(y).astype(np.int64).reshape(-1)
        stage = np.searchsorted(np.asarray(self.nesting.sizes), dims)
        flops = head_flops(self.nesting, self.num_classes_, self.is_tied)
        return {
            "accuracy": float((pred == y).mean()),
            "expected_dim": float(dims.mean()),
            "flops": float(flops[stage].mean()),
            "fraction_per_size": {int(m): float((dims == m).mean()) for m in self.nesting.sizes},
        }

    def score(self, x: Any, y: Any) -> float:
        """Cascade accuracy on ``(x, y)`` (sklearn's ``score``)."""
        return float(self.evaluate(x, y)["accuracy"])


def cascade_curve(
    logits: np.ndarray,
    y: np.ndarray,
    nesting: Nesting,
    *,
    tied: bool = False,
    confidence: str = "max_softmax",
    targets: Sequence[float] | None = None,
    val_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, list[dict[str, float]]]:
    """Accuracy vs expected dimension and head FLOPs: the cascade against fixed sizes.

    ``logits`` ``(L, B, C)`` and ``y`` ``(B,)`` are split at random (``seed``): thresholds are fitted
    on ``val_fraction`` of the inputs for each target accuracy and measured on the rest, so the
    curve is not fitted on its own points. ``targets`` defaults to 12 values from the smallest
    size's to the largest size's validation accuracy. Returns ``{"fixed": [...], "cascade": [...]}``,
    each point a dict with ``accuracy``, ``expected_dim`` and ``flops`` (``target`` for the cascade).
    """
    logits = np.asarray(logits, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    if logits.ndim != 3 or logits.shape[0] != len(nesting) or logits.shape[1] != y.shape[0]:
        raise ValueError(
            f"logits.shape={logits.shape} must be (L={len(nesting)}, B={y.shape[0]}, C): one "
            f"row of logits per size of {nesting!r} and per label."
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1), e.g. 0.5.")
    n = y.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} inputs leaves an empty split: use more inputs."
        )
    val, test = perm[:n_val], perm[n_val:]
    conf = confidence_scores(logits, confidence)  # (L, B)
    correct = logits.argmax(-1) == y[None, :]  # (L, B)
    sizes = np.asarray(nesting.sizes)
    flops = head_flops(nesting, logits.shape[-1], tied)
    fixed = [
        {
            "size": float(m),
            "accuracy": float(correct[i, test].mean()),
            "expected_dim": float(m),
            "flops": float(2.0 * m * logits.shape[-1]),
        }
        for i, m in enumerate(sizes)
    ]
    if targets is None:
        lo, hi = correct[0, val].mean(), correct[-1, val].mean()
        targets = np.linspace(min(lo, hi), hi, 12).tolist()
    points = []
    for t in targets:
        thr = fit_thresholds(conf[:, val], correct[:, val], float(t))
        stages = cascade_stages(conf[:, test], thr)
        points.append(
            {
                "target": float(t),
                "accuracy": float(correct[stages, test].mean()),
                "expected_dim": float(sizes[stages].mean()),
                "flops": float(flops[stages].mean()),
            }
        )
    return {"fixed": fixed, "cascade": points}
