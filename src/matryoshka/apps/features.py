"""Feature extraction: any pretrained model as the feature extractor of a Matryoshka embedding.

* :class:`MultiLevelFeatures` wraps any backbone and also returns the pooled outputs of named
  inner modules (several stages of a ResNet, say): ``(B, ...) -> (B, D_1 + ... + D_k)``.
* :class:`MatryoshkaProjection` puts a trainable linear map ``D -> d`` on top of a frozen
  extractor; trained with a :class:`~matryoshka.models.heads.MatryoshkaHead`, its output is nested, so a
  pretrained model that was never trained for it yields features at any size.
* :func:`embed_images` extracts nested features of an image split from a model saved by
  ``mrl train`` (``mrl embed-images``).

The recipe uses the shipped all-MiniLM-L6-v2 (frozen) on WordNet's 45 lexicographer categories:
pooled layers 3 and 6 -> Matryoshka projection, against MiniLM's own embedding truncated and
PCA, each read out by a linear probe.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from matryoshka.apps.common import (
    check_positive,
    config_to_dict,
    finish,
    load_digits_images,
    make_nesting,
)
from matryoshka.config import help_field
from matryoshka.evaluation.image import linear_probe, posthoc_reduce
from matryoshka.losses.classification import MatryoshkaLoss
from matryoshka.models.heads import MatryoshkaHead
from matryoshka.ops import truncate
from matryoshka.training.image import seed_everything
from matryoshka.training.loop import fit

__all__ = [
    "FeaturesConfig",
    "MatryoshkaProjection",
    "MultiLevelFeatures",
    "embed_images",
    "pool",
    "run_features",
]


def pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pool to ``(B, C)``: ``(B, C)`` as is, ``(B, C, H, W)`` over space,
    ``(B, T, C)`` over tokens."""
    if t.ndim == 2:
        return t
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    raise ValueError(f"cannot pool a feature of shape {tuple(t.shape)}: expected 2, 3 or 4 dims.")


class MultiLevelFeatures(nn.Module):
    """A backbone's output plus the pooled outputs of inner modules ``layers``, concatenated.

    Args:
        backbone: any ``nn.Module``.
        layers: names from ``backbone.named_modules()`` (e.g. ``["net.layer3", "net.layer4"]``
            for the ``resnet18`` backbone); their outputs are captured by forward hooks.
        include_output: also append the backbone's own (pooled) output, last.
    """

    def __init__(
        self, backbone: nn.Module, layers: Sequence[str] = (), include_output: bool = True
    ) -> None:
        super().__init__()
        modules = dict(backbone.named_modules())
        unknown = [name for name in layers if name not in modules or name == ""]
        if unknown:
            names = [n for n in modules if n][:12]
            raise ValueError(
                f"layers {unknown} are not modules of {type(backbone).__name__}: pick from "
                f"named_modules(), e.g. {names}."
            )
        if not layers and not include_output:
            raise ValueError("no features: give layers or keep include_output=True.")
        self.backbone = backbone
        self.layers = list(layers)
        self.include_output = include_output
        self._captured: dict[str, torch.Tensor] = {}
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def forward_levels(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer: (B, D_layer)}`` pooled features, plus ``"output"`` if included."""
        self._captured = {}
        out = self.backbone(x)
        levels = {name: pool(self._captured[name]) for name in self.layers}
        if self.include_output:
            levels["output"] = pool(out)
        self._captured = {}
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, sum of level widths)``."""
        return torch.cat(list(self.forward_levels(x).values()), dim=1)


class MatryoshkaProjection(nn.Module):
    """``extractor`` (frozen unless ``trainable``) followed by a linear map to ``embed_dim``.

    ``in_features`` is the extractor's output width. ``forward(x) -> (B, embed_dim)``; use it as
    the backbone of a :class:`~matryoshka.models.classifier.MatryoshkaClassifier`, or call
    :meth:`project` on cached features.
    """

    def __init__(
        self, extractor: nn.Module | None, in_features: int, embed_dim: int, trainable: bool = False
    ) -> None:
        super().__init__()
        self.extractor = extractor
        if extractor is not None and not trainable:
            for p in extractor.parameters():
                p.requires_grad_(False)
        self.embed_dim = embed_dim
        self.proj = nn.Linear(in_features, embed_dim)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Cached extractor features ``(B, in_features) -> (B, embed_dim)``."""
        return self.proj(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, embed_dim)``."""
        if self.extractor is None:
            return self.proj(x)
        return self.proj(self.extractor(x))


@torch.no_grad()
def embed_images(
    model_path: str | Path,
    data: str = "mnist-subset",
    split: str = "test",
    dim: int | None = None,
    data_root: str | None = None,
    normalize: bool = False,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Nested features of one split from a model saved by ``mrl train``.

    Returns ``(z, y)``: ``z (N, m)`` float32, the first ``m = dim`` coordinates of the embedding
    (all of them if ``dim`` is None), followed by the pooled outputs of ``layers`` if given;
    ``y (N,)`` the labels.
    """
    from matryoshka.data.images import load_dataset
    from matryoshka.training.image import load_model

    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} must be 'train', 'val' or 'test'.")
    model, _ = load_model(model_path)
    splits = load_digits_images() if data == "digits-8x8" else load_dataset(data, data_root)
    x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    d = int(model.nesting.dim)
    m = d if dim is None else dim
    if isinstance(m, bool) or not 1 <= m <= d:
        raise ValueError(f"dim={dim} must be in [1, {d}] (the model's embedding size).")
    extractor = MultiLevelFeatures(model.backbone, layers or (), include_output=True)
    outs = []
    for xb in tqdm(x.split(batch_size), desc="embed", leave=False):
        levels = extractor.forward_levels(xb)
        z = truncate(levels.pop("output"), m, normalize=normalize)
        outs.append(torch.cat([z, *levels.values()], dim=1))
    return torch.cat(outs).numpy().astype(np.float32), y.numpy()


@dataclass
class FeaturesConfig:
    """Feature-extraction recipe: frozen MiniLM on WordNet lexicographer categories."""

    n_train: int = help_field("training synsets (sampled, seeded)", default=4000)
    n_test: int = help_field("test synsets", default=1500)
    layers: list[int] = help_field(
        "MiniLM layers (1-based) whose mean-pooled states are concatenated",
        default_factory=lambda: [3, 6],
    )
    embed_dim: int = help_field("Matryoshka embedding size d", default=128)
    nesting_start: int = help_field("first size of the doubling ladder", default=4)
    epochs: int = help_field("epochs of the projection + heads", default=60)
    lr: float = help_field("AdamW learning rate", default=2e-3)
    wordnet_root: str = help_field("folder of WordNet's data files", default="/usr/share/wordnet")
    seed: int = help_field("seed", default=0)
    out_dir: str = help_field("report folder", default="runs/app_features")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        check_positive(self, "n_train", "n_test", "embed_dim", "nesting_start", "epochs")
        if not self.layers or any(layer < 1 for layer in self.layers):
            raise ValueError(f"layers={self.layers} must be 1-based layer numbers, e.g. [3, 6].")
        make_nesting(self.embed_dim, self.nesting_start)


@torch.no_grad()
def _minilm_levels(
    texts: Sequence[str], layers: Sequence[int], progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, len(layers) * 384)`` concatenated pooled layers, ``(N, 384)`` MiniLM's embeddings
    (its last layer, mean-pooled, not normalised)."""
    from matryoshka.models.text_encoder import TextEncoder

    enc = TextEncoder()
    enc.model.eval()
    if max(layers) > enc.n_layers:
        raise ValueError(f"layers={list(layers)} but MiniLM has {enc.n_layers} layers.")
    multi, final = [], []
    for i in tqdm(range(0, len(texts), 64), desc="MiniLM", disable=not progress, leave=False):
        feats = enc.tokenize(texts[i : i + 64])
        hidden = enc.forward_layers(feats)  # (n_layers, B, 384)
        multi.append(torch.cat([hidden[layer - 1] for layer in layers], dim=1))
        final.append(hidden[-1])  # MiniLM's own mean-pooled output (before normalisation)
    return torch.cat(multi).numpy(), torch.cat(final).numpy()


def run_features(config: FeaturesConfig) -> dict[str, Any]:
    """Encode WordNet definitions with frozen MiniLM, train the Matryoshka projection, compare
    with MiniLM truncated and PCA; write the report."""
    from matryoshka.data.wordnet import lexname_task, load_synsets

    t0 = time.perf_counter()
    synsets = load_synsets(config.wordnet_root)
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(synsets), config.n_train + config.n_test, replace=False)
    task = lexname_task([synsets[i] for i in pick])
    y = task.labels
    multi, final = _minilm_levels(list(task.texts), config.layers, config.progress)
    tr, te = slice(0, config.n_train), slice(config.n_train, None)
    nesting = make_nesting(config.embed_dim, config.nesting_start)
    sizes = [m for m in nesting if m <= final.shape[1]]

    seed_everything(config.seed)
    mu, sd = multi[tr].mean(0), multi[tr].std(0) + 1e-6
    x_tr = torch.from_numpy((multi[tr] - mu) / sd)
    x_te = torch.from_numpy((multi[te] - mu) / sd)
    y_tr = torch.from_numpy(y[tr])
    proj = MatryoshkaProjection(None, x_tr.shape[1], config.embed_dim)
    head = MatryoshkaHead(config.embed_dim, len(task.label_names), nesting)
    loss_fn = MatryoshkaLoss(nesting=nesting)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(head(proj(x_tr[idx])), y_tr[idx]).loss

    params = [*proj.parameters(), *head.parameters()]
    fit(
        params,
        step,
        len(y_tr),
        config.epochs,
        256,
        config.lr,
        seed=config.seed,
        weight_decay=0.05,
        progress=config.progress,
        desc="Matryoshka projection",
    )
    with torch.no_grad():
        logits = head(proj(x_te))  # (L, N, C)
        z_tr, z_te = proj(x_tr).numpy(), proj(x_te).numpy()
    heads_acc = (logits.argmax(-1) == torch.from_numpy(y[te])).double().mean(1).tolist()
    idx = [nesting.index(m) for m in sizes]
    metrics: dict[str, dict[str, list[Any]]] = {"top1": {}}
    metrics["top1"]["Matryoshka projection (its heads)"] = [heads_acc[i] for i in idx]
    metrics["top1"]["Matryoshka projection + linear probe"] = [
        linear_probe(z_tr[:, :m], y[tr], z_te[:, :m], y[te], config.seed) for m in sizes
    ]
    for method in ("truncation", "pca"):
        rows = []
        for m in sizes:
            a, b = posthoc_reduce(method, final[tr], final[te], m, config.seed)
            rows.append(linear_probe(a, y[tr], b, y[te], config.seed))
        metrics["top1"][f"MiniLM {method} + linear probe"] = rows  # type: ignore[assignment]
    mp = metrics["top1"]["Matryoshka projection (its heads)"]
    tr_ = metrics["top1"]["MiniLM truncation + linear probe"]
    notes = [
        f"{len(task.label_names)} lexicographer categories; {config.n_train} train / "
        f"{config.n_test} test WordNet definitions; frozen all-MiniLM-L6-v2, mean-pooled layers "
        f"{config.layers} -> linear projection to d={config.embed_dim}",
        f"at m={sizes[0]}: Matryoshka projection {100 * mp[0]:.1f}% vs MiniLM truncated "  # type: ignore[operator]
        f"{100 * tr_[0]:.1f}%; at m={sizes[-1]}: {100 * mp[-1]:.1f}% vs {100 * tr_[-1]:.1f}%",  # type: ignore[operator]
    ]
    results = {
        "task": "Feature extraction: frozen MiniLM -> Matryoshka projection, WordNet categories",
        "sizes": sizes,
        "metrics": metrics,
        "metric_labels": {"top1": "test top-1 (45 categories)"},
        "notes": notes,
        "meta": {"config": config_to_dict(config)},
    }
    return finish(results, config.out_dir, t0)
