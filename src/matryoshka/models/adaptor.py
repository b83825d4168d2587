"""Post-hoc Matryoshka adaptor: make a frozen model's embeddings nested, without touching it.

``MatryoshkaAdaptor(nesting).fit(embeddings)`` learns a small map ``f`` on cached embeddings so
that every prefix ``f(x)[:m]`` keeps the similarity structure of the full vectors ``x``
(in the spirit of Yoon et al., "Matryoshka-Adaptor", EMNLP 2024):

    z = x R                 R (d, d) initialised with the right singular vectors of the data
                            (uncentred PCA: prefixes of z are the best rank-m inner-product
                            approximations, the strongest linear starting point)
    f(x) = z + MLP(z)       a residual MLP whose output layer starts at zero, so f = PCA at step 0

Unsupervised loss, per prefix size ``m`` (weights from the nesting), on batches of embeddings:

* pairwise: ``|cos(f(x_i)[:m], f(x_j)[:m]) - cos(x_i, x_j)|`` averaged over all pairs;
* listwise: ``KL(p_i || q_i)`` with ``p_i = softmax_j(cos(x_i, x_j) / t)`` and ``q_i`` the same
  over the prefix cosines (``j != i``, ``t = listwise_temperature``): the prefix must rank each
  row's neighbours as the full vectors do, weighted towards the nearest ones (the ones
  retrieval returns);
* top-k (off by default): the pairwise error over each row's ``top_k`` nearest neighbours;
* ``reg * |f(x) - x R_0|^2`` keeping the map near its start.

``orthogonal=True`` learns the rotation alone (``f(x) = x R`` with ``R`` kept exactly orthogonal
by ``torch.nn.utils.parametrizations.orthogonal``, from the same PCA start, same losses): every
full-size cosine is unchanged, so the full-size results of a search over adapted vectors are the
base model's own, while the prefixes get more nested than PCA's. That is the variant a funnel
wants: shortlist with an adapted prefix, rerank at full size, and the reference is the base
model's exact search. (On 117k MiniLM WordNet definitions, with 1,000 usage-example queries: a
64-d exact shortlist of k' = 200 reranked at full size recovers 0.936 of the top-10 after PCA and
0.958 after the rotation fitted on 20k rows, 4 epochs; ``benchmarks/retrieval.py
--adaptor-orthogonal`` measures it beside PCA.)

On WordNet (MiniLM, 20k training synsets) the listwise term is what lifts the unsupervised
adaptor above PCA at 8 and 16 dims (nDCG@10 11.1 vs 6.6 at 8 dims; pairwise + top-k alone
stayed below PCA there). Optional supervised mode: ``fit(embeddings, queries=q, documents=d)`` adds the fused
Matryoshka InfoNCE on the pairs (:class:`matryoshka.losses.contrastive.MatryoshkaContrastiveLoss`).

Saved as safetensors (weights) + JSON (parameters); no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils.parametrizations import orthogonal as orthogonal_map
from tqdm.auto import tqdm

from matryoshka._validate import as_embeddings, check_nesting, positive_int
from matryoshka.io import atomic_write_bytes
from matryoshka.losses.contrastive import MatryoshkaContrastiveLoss
from matryoshka.losses.distill import similarity_distill_loss
from matryoshka.nesting import Nesting
from matryoshka.ops import normalize, prefix_similarities, truncate_numpy

__all__ = ["MatryoshkaAdaptor", "NotFittedError"]


class NotFittedError(RuntimeError):
    """Raised when an adaptor is used before :meth:`MatryoshkaAdaptor.fit`."""


class _AdaptorNet(nn.Module):
    """``(B, d) -> (B, d)``: ``z = x R``, ``f = z + MLP(z)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.rotation = nn.Parameter(torch.eye(dim))  # (d, d)
        out = nn.Linear(hidden, dim)
        nn.init.zeros_(out.weight)  # f starts as the rotation alone
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.rotation  # (B, d)
        return z + self.mlp(z)


class MatryoshkaAdaptor:
    """Learned nested map on frozen embeddings, scikit-learn style.

    Args:
        nesting: the prefix sizes to serve (``nesting.dim`` = the embedding size ``d``); its
            weights weight the per-size losses.
        hidden: width of the residual MLP.
        epochs: passes over the embeddings.
        batch_size: embeddings per step (the pairwise loss looks at ``batch_size^2`` pairs).
        lr: Adam learning rate.
        top_k: neighbours per row in the top-k term (within a batch).
        topk_weight: weight of the top-k term relative to the pairwise one.
        pairwise_weight: weight of the pairwise term.
        listwise_weight: weight of the listwise (neighbour-distribution) term.
        listwise_temperature: softmax temperature of the listwise term.
        reg: weight of the ``|f(x) - x R_0|^2`` regulariser.
        supervised_weight: weight of the InfoNCE term in supervised mode.
        temperature: of that InfoNCE term.
        seed: seeds the initialisation and the batch order.
        progress: show a progress bar while fitting.
        orthogonal: learn an orthogonal rotation only (no MLP): full-size cosines are kept
            exactly, only the order of information along the coordinates changes.

    After :meth:`fit`: ``net_`` (the torch module), ``history_`` (mean loss per epoch).
    """

    def __init__(
        self,
        nesting: Nesting,
        hidden: int = 512,
        epochs: int = 8,
        batch_size: int = 512,
        lr: float = 1e-3,
        top_k: int = 10,
        topk_weight: float = 0.0,
        reg: float = 0.0,
        supervised_weight: float = 1.0,
        temperature: float = 0.05,
        seed: int = 0,
        progress: bool = True,
        pairwise_weight: float = 1.0,
        listwise_weight: float = 1.0,
        listwise_temperature: float = 0.05,
        orthogonal: bool = False,
    ) -> None:
        check_nesting(nesting, "MatryoshkaAdaptor(Nesting.doubling(8, 384))")
        for name, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size)):
            positive_int(value, name)
        positive_int(top_k, "top_k", 10)
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be positive, e.g. 1e-3.")
        weights: tuple[tuple[str, float, str], ...] = (
            ("topk_weight", topk_weight, "1.0"),
            ("reg", reg, "0.5"),
            ("supervised_weight", supervised_weight, "1.0"),
            ("pairwise_weight", pairwise_weight, "1.0"),
            ("listwise_weight", listwise_weight, "1.0"),
        )
        for name, weight, example in weights:
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
                raise ValueError(f"{name}={weight!r} must be a float >= 0, e.g. {example}.")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not (0 < temperature < float("inf"))
        ):
            raise ValueError(f"temperature={temperature!r} must be a positive float, e.g. 0.05.")
        t = listwise_temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError(
                f"listwise_temperature={t!r} must be a positive float, e.g. 0.05 (cosines / t)."
            )
        self.nesting = nesting
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.top_k = top_k
        self.topk_weight = topk_weight
        self.reg = reg
        self.supervised_weight = supervised_weight
        self.temperature = temperature
        self.seed = seed
        self.progress = progress
        self.pairwise_weight = pairwise_weight
        self.listwise_weight = listwise_weight
        self.listwise_temperature = float(listwise_temperature)
        if not isinstance(orthogonal, bool):
            raise ValueError(f"orthogonal={orthogonal!r} must be True or False.")
        self.orthogonal = orthogonal
        self.net_: _AdaptorNet | None = None
        self.history_: list[float] = []

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (JSON-ready)."""
        return {
            "nesting": self.nesting.to_dict(),
            "hidden": self.hidden,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "top_k": self.top_k,
            "topk_weight": self.topk_weight,
            "reg": self.reg,
            "supervised_weight": self.supervised_weight,
            "temperature": self.temperature,
            "seed": self.seed,
            "progress": self.progress,
            "pairwise_weight": self.pairwise_weight,
            "listwise_weight": self.listwise_weight,
            "listwise_temperature": self.listwise_temperature,
            "orthogonal": self.orthogonal,
        }

    def _similarity_loss(
        self, y: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Pairwise + listwise (+ top-k) similarity preservation: ``(B, d), (B, B) -> scalar``.

        The pairwise and listwise terms are :func:`~matryoshka.losses.distill.similarity_distill_loss`
        (the same objective the self-distilled encoder is trained with)."""
        loss, _ = similarity_distill_loss(
            y,
            target,
            self.nesting,
            weights,
            pairwise_weight=self.pairwise_weight,
            listwise_weight=self.listwise_weight,
            temperature=self.listwise_temperature,
        )
        k = min(self.top_k + 1, target.shape[1])
        if self.topk_weight > 0 and k > 1:
            err = (prefix_similarities(y, y, self.nesting) - target).abs()  # (L, B, B)
            nn_idx = target.topk(k, dim=1).indices[:, 1:]  # (B, k-1), skipping the row itself
            top = err.gather(2, nn_idx.expand(err.shape[0], -1, -1)).mean(dim=(1, 2))  # (L,)
            loss = loss + (weights * self.topk_weight * top).sum()
        return loss

    def fit(
        self,
        embeddings: np.ndarray | torch.Tensor,
        queries: np.ndarray | torch.Tensor | None = None,
        documents: np.ndarray | torch.Tensor | None = None,
    ) -> MatryoshkaAdaptor:
        """Learn the map on ``embeddings (N, d)``; returns ``self``.

        Supervised mode: also pass ``queries (P, d)`` and ``documents (P, d)`` embeddings of
        matching pairs (row ``i`` of each belong together).
        """
        d = self.nesting.dim
        x = as_embeddings(embeddings, "embeddings", d, finite=True)
        if x.shape[0] < 2:
            raise ValueError(f"embeddings has {x.shape[0]} row(s): fit needs at least 2.")
        if (queries is None) != (documents is None):
            raise ValueError(
                "queries and documents go together: pass both (supervised mode) or neither."
            )
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        if queries is not None and documents is not None:
            qa = as_embeddings(queries, "queries", d, finite=True)
            da = as_embeddings(documents, "documents", d, finite=True)
            if qa.shape[0] != da.shape[0] or qa.shape[0] < 2:
                raise ValueError(
                    f"queries has {qa.shape[0]} rows and documents {da.shape[0]}: pass at least "
                    "2 matching pairs, the same number of each."
                )
            pairs = (torch.from_numpy(qa), torch.from_numpy(da))
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        xt = normalize(torch.from_numpy(x))  # (N, d): cosine structure is what we keep
        net = _AdaptorNet(d, self.hidden)
        with torch.no_grad():
            sub = xt[torch.randperm(xt.shape[0], generator=gen)[:20000]]
            # Uncentred PCA; with fewer rows than dims the basis is completed to (d, d).
            _, _, vh = torch.linalg.svd(sub.double(), full_matrices=sub.shape[0] < d)
            net.rotation.copy_(vh.T.float())
        r0 = net.rotation.detach().clone()
        model: nn.Module = net
        if self.orthogonal:  # the rotation alone, kept orthogonal; copied into net at the end
            model = orthogonal_map(nn.Linear(d, d, bias=False))
            with torch.no_grad():
                model.weight = r0.T.contiguous()  # Linear computes x W^T = x R
        weights = torch.tensor(self.nesting.weights)
        weights = weights / weights.sum()
        nce = MatryoshkaContrastiveLoss(self.nesting, temperature=self.temperature)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        n = xt.shape[0]
        steps = max(1, n // self.batch_size)
        bar = tqdm(total=self.epochs * steps, desc="fit adaptor", disable=not self.progress)
        self.history_ = []
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(steps):
                xb = xt[perm[s * self.batch_size : (s + 1) * self.batch_size]]  # (B, d)
                yb = model(xb)
                loss = self._similarity_loss(yb, xb @ xb.T, weights)
                if self.reg > 0:
                    loss = loss + self.reg * (yb - xb @ r0).square().sum(1).mean()
                if pairs is not None:
                    idx = torch.randint(0, pairs[0].shape[0], (self.batch_size,), generator=gen)
                    out = nce(model(pairs[0][idx]), model(pairs[1][idx]))
                    loss = loss + self.supervised_weight * out.loss / weights.numel()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().item()
                bar.update(1)
            self.history_.append(total / steps)
            bar.set_postfix(loss=f"{self.history_[-1]:.4f}")
        bar.close()
        if self.orthogonal:  # f(x) = x R exactly: the MLP's zero output layer stays zero
            with torch.no_grad():
                net.rotation.copy_(model(torch.eye(d)))  # rows of I R: the rotation itself
        net.eval()
        self.net_ = net
        return self

    def _check_fitted(self) -> _AdaptorNet:
        if self.net_ is None:
            raise NotFittedError(
                "this MatryoshkaAdaptor is not fitted yet: call fit(embeddings) or load(path) first."
            )
        return self.net_

    @torch.no_grad()
    def transform(
        self, x: np.ndarray | torch.Tensor, dim: int | None = None, normalize: bool = True
    ) -> np.ndarray:
        """Adapted embeddings cut to ``dim``: ``(n, d) -> (n, dim)`` float32 (``dim=None``: all
        ``d``). With ``normalize=True`` each prefix has unit norm (ready for cosine/IP search)."""
        net = self._check_fitted()
        arr = as_embeddings(x, "x", self.nesting.dim, finite=True)
        out = np.empty_like(arr)
        xt = _normalize_t(torch.from_numpy(arr))
        for s in range(0, arr.shape[0], 8192):
            out[s : s + 8192] = net(xt[s : s + 8192]).numpy()
        return truncate_numpy(out, dim if dim is not None else self.nesting.dim, normalize)

    def fit_transform(
        self, x: np.ndarray | torch.Tensor, dim: int | None = None, normalize: bool = True
    ) -> np.ndarray:
        """:meth:`fit` then :meth:`transform`: ``(n, d) -> (n, dim)``."""
        return self.fit(x).transform(x, dim=dim, normalize=normalize)

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (weights) and ``path.json`` (parameters); returns the
        safetensors path. ``path`` may name either file or their common stem."""
        net = self._check_fitted()
        stem = _stem(path)
        tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        atomic_write_bytes(stem.with_suffix(".safetensors"), st_save(tensors))
        meta = {
            "format": "matryoshka.adaptor/1",
            "params": self.get_params(),
            "history": self.history_,
        }
        atomic_write_bytes(stem.with_suffix(".json"), json.dumps(meta, indent=2).encode())
        return stem.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> MatryoshkaAdaptor:
        """Read an adaptor written by :meth:`save`."""
        stem = _stem(path)
        meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"path={str(path)!r}: {p} is missing; pass the stem written by "
                    "MatryoshkaAdaptor.save (both .json and .safetensors)."
                )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "matryoshka.adaptor/1":
            raise ValueError(
                f"{meta_path} has format={meta.get('format')!r}, not 'matryoshka.adaptor/1': "
                "it was not written by MatryoshkaAdaptor.save."
            )
        params = dict(meta["params"])
        params["nesting"] = Nesting.from_dict(params["nesting"])
        self = cls(**params)
        net = _AdaptorNet(self.nesting.dim, self.hidden)
        net.load_state_dict(load_file(str(weights_path)))
        net.eval()
        self.net_ = net
        self.history_ = list(meta.get("history", []))
        return self


_normalize_t = normalize  # `transform` shadows the name with its keyword argument


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
