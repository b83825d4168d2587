"""Fine-tune a text encoder with the Matryoshka loss inside sentence-transformers' trainer.

    mrl train --config configs/text_wordnet_mrl.yaml        # WordNet pairs (the default data)
    mrl train --config configs/text_own_data.yaml           # your pairs: data: pairs.jsonl
    mrl train --config ... --resume                         # continue an interrupted run
    mrl eval --run runs/text_mrl [--beir FOLDER]            # per-size retrieval

:func:`train_text` runs ``SentenceTransformerTrainer`` with
:class:`~matryoshka.losses.sentence_transformers.FusedMatryoshkaLoss` over the recipe's
``sizes`` (``MatryoshkaLoss(MultipleNegativesRankingLoss)`` in one fused pass;
``matryoshka: false`` trains the full size only, the baseline that is truncated afterwards), so
checkpoints, resuming, bf16 on CUDA and ``torchrun`` / ``accelerate launch`` are the trainer's.
The pairs are the recipe's ``data`` (a JSONL / CSV / Parquet file or a saved ``datasets``
folder, :func:`~matryoshka.data.pairs.load_pairs`), or WordNet (definition, lemmas) pairs from a
seeded share of the synsets when ``data`` is absent. ``eval_data`` (pairs, or a BEIR folder's
``dev`` split) is scored per size at every checkpoint and at the end.

The run folder holds ``model/`` (a plain sentence-transformers folder: ``SentenceTransformer(path)``
loads it without this package; its README.md model card names the loss and the sizes),
``text_model.json`` (config, loss, sizes, data, timings) and, only while a run is unfinished,
``checkpoints/``. The 2D recipe (``layers:``) keeps the hand-written loop :func:`finetune`: its
loss reads every layer's pooled output, which a sentence-transformers loss does not see.

Data flows one way: this module imports no evaluation code (the evaluation fine-tunes with
:func:`finetune` as a baseline, so it imports this module).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from matryoshka.config import from_dict
from matryoshka.io import atomic_write_bytes
from matryoshka.training.text_options import (
    WordnetTextOptions,
    check_sizes_match_model,
    check_text_options,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from matryoshka.data.wordnet import Synset
    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

__all__ = [
    "CHECKPOINTS",
    "TEXT_MODEL_FILE",
    "TEXT_MODEL_FORMAT",
    "TextTrainConfig",
    "build_loss",
    "finetune",
    "latest_checkpoint",
    "sample_pairs",
    "train_text",
]

#: The metadata file that marks a run folder as a fine-tuned text model.
TEXT_MODEL_FILE = "text_model.json"
#: ``format`` of :data:`TEXT_MODEL_FILE`.
TEXT_MODEL_FORMAT = "matryoshka.text_model/1"
#: The trainer's checkpoint folder inside a run folder (removed once the run has finished).
CHECKPOINTS = "checkpoints"


@dataclass
class TextTrainConfig(WordnetTextOptions):
    """Options of :func:`train_text` (YAML keys; ``task: text`` routes ``mrl train`` here).

    Validated on construction; :meth:`from_dict` reads a YAML recipe's mapping.
    """

    task: str = field(
        default="text",
        metadata={"help": "must be 'text' (tells `mrl train` this is a text recipe)"},
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "sentence-transformers model name or path (default: the bundled all-MiniLM-L6-v2)"
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "your training pairs: a .jsonl/.csv/.parquet file or a Dataset.save_to_disk "
            "folder with (anchor, positive[, negative]) columns; absent: WordNet pairs"
        },
    )
    columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "the data's columns to use as (anchor, positive[, negative...]), e.g. "
            "[query, doc] (default: anchor, positive and negative if present)"
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "scored per size at each checkpoint: a pairs file like data (same columns) "
            "or a BEIR folder (its qrels/dev.tsv)"
        },
    )
    matryoshka: bool = field(
        default=True,
        metadata={
            "help": "train every size with the fused Matryoshka loss (false: full size only)"
        },
    )
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step (in-batch negatives)"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate"})
    temperature: float = field(
        default=0.05,
        metadata={"help": "softmax temperature on cosine similarities (the loss's scale is 1/t)"},
    )
    n_sizes_per_step: int | None = field(
        default=None,
        metadata={"help": "train a random subset of this many sizes each step (default: all)"},
    )
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "2D Matryoshka: also train these layers' pooled outputs (0-based, ending at "
            "the last layer, e.g. [1, 3, 5] for MiniLM)"
        },
    )
    checkpoint_every: int = field(
        default=0,
        metadata={"help": "checkpoint (and score eval_data) every N steps (0: each epoch's end)"},
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "how many recent checkpoints to keep while training"}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue an interrupted run from the newest complete checkpoint in "
            "out_dir/checkpoints"
        },
    )
    out_dir: str = field(
        default="runs/text_mrl", metadata={"help": "run folder: model/ and text_model.json"}
    )
    wordnet_root: str = field(
        default="/usr/share/wordnet", metadata={"help": "WordNet data folder"}
    )

    def __post_init__(self) -> None:
        if self.task != "text":
            raise ValueError(f"task={self.task!r} must be 'text' in a text training recipe.")
        check_text_options(
            self,
            ints=(
                ("train_pairs", 2),
                ("epochs", 1),
                ("batch_size", 2),
                ("seed", 0),
                ("checkpoint_every", 0),
                ("keep_checkpoints", 1),
            ),
            floats=(("lr", 0.0, False), ("temperature", 0.0, False)),
        )
        n = self.n_sizes_per_step
        if n is not None and (
            isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.sizes)
        ):
            raise ValueError(
                f"n_sizes_per_step={n!r} must be null (every size) or an int in "
                f"[1, {len(self.sizes)}] (the recipe has {len(self.sizes)} sizes)."
            )
        if n is not None and not self.matryoshka:
            raise ValueError(
                f"n_sizes_per_step={n} with matryoshka: false: the plain baseline trains the full "
                "size only; drop n_sizes_per_step or set matryoshka: true."
            )
        layers = self.layers
        if layers is not None and (
            not isinstance(layers, list)
            or not layers
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers)
            or layers != sorted(set(layers))
        ):
            raise ValueError(
                f"layers={layers!r} must be null or increasing 0-based layer indices ending at "
                "the model's last layer, e.g. [1, 3, 5] for MiniLM's 6 layers."
            )
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(
                    f"{name}={value!r} must be a path (a non-empty string), e.g. pairs.jsonl."
                )
        if self.columns is not None and self.data is None:
            raise ValueError(
                f"columns={self.columns!r} needs data: name your pairs file with data: "
                "(WordNet pairs have fixed columns), or drop columns."
            )
        if layers is not None and self.eval_data is not None:
            raise ValueError(
                f"eval_data={self.eval_data!r} with layers={layers}: the 2D loop scores no "
                "evaluation set while training; drop eval_data (mrl eval scores the run after)."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextTrainConfig:
        """Build from a mapping (e.g. a YAML recipe); unknown keys are an error naming them."""
        return from_dict(cls, data)


# --- the loss and the trainer ---------------------------------------------------------------------


def build_loss(
    model: SentenceTransformer,
    sizes: Sequence[int],
    matryoshka: bool = True,
    temperature: float = 0.05,
    n_sizes_per_step: int | None = None,
) -> FusedMatryoshkaLoss:
    """The recipe's loss: :class:`FusedMatryoshkaLoss` over ``sizes`` (``matryoshka=False``: the
    largest size alone, i.e. MultipleNegativesRankingLoss), ``scale = 1 / temperature``,
    ``n_dims_per_step = n_sizes_per_step`` (``None``: every size, ``-1``)."""
    from matryoshka.losses.sentence_transformers import FusedMatryoshkaLoss

    dims = list(sizes) if matryoshka else [max(sizes)]
    return FusedMatryoshkaLoss(
        model,
        dims,
        n_dims_per_step=-1 if n_sizes_per_step is None else n_sizes_per_step,
        scale=1.0 / temperature,
    )


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _use_bf16() -> bool:
    """bf16 mixed precision where it is real: a CUDA device that supports it; never on CPU."""
    import torch

    return bool(_cuda() and torch.cuda.is_bf16_supported())


def _training_arguments(
    output_dir: str | Path,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    save: bool,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    evaluate: bool = False,
) -> Any:
    """``SentenceTransformerTrainingArguments`` for one run; checkpoints (``save``) every
    ``checkpoint_every`` steps, or at each epoch's end when it is 0, and the evaluator (``evaluate``)
    at the same times. Batches hold no duplicate texts (a duplicate would be a false negative);
    bf16 on a CUDA device that supports it."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    strategy = "steps" if checkpoint_every else "epoch"
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        seed=seed,
        data_seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy=strategy if save else "no",
        save_steps=checkpoint_every or 500,
        save_total_limit=keep_checkpoints,
        eval_strategy=strategy if evaluate else "no",
        eval_steps=checkpoint_every or None,
        logging_strategy="steps" if progress else "no",
        logging_steps=max(1, checkpoint_every or 50),
        report_to="none",
        disable_tqdm=not progress,
        bf16=_use_bf16(),
        dataloader_pin_memory=_cuda(),
    )


def _checkpoint_step(path: Path) -> int | None:
    """The step of a complete trainer checkpoint folder, else ``None``.

    The trainer writes ``trainer_state.json`` last, so a checkpoint cut short by an interruption
    has none (or a truncated one) and is never resumed from.
    """
    try:
        step = int(path.name.rsplit("-", 1)[1])
        json.loads((path / "trainer_state.json").read_text())
    except (IndexError, ValueError, OSError):
        return None
    return step


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the highest step under ``folder``."""
    steps = {}
    for p in Path(folder).glob("checkpoint-*"):
        step = _checkpoint_step(p)
        if p.is_dir() and step is not None:
            steps[step] = p
    return steps[max(steps)] if steps else None


def _resume_from(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (``resume``), or ``None`` for a fresh run; refuses a fresh
    run over an interrupted one and a resume with nothing to resume, naming the fix."""
    ckpt = out / CHECKPOINTS
    found = latest_checkpoint(ckpt)
    if resume and found is None:
        done = (
            " (the run there has finished: model/ is its result)"
            if (out / "model").is_dir()
            else ""
        )
        raise ValueError(
            f"resume=True but out_dir={str(out)!r} has no complete checkpoint in {ckpt}{done}: "
            "drop --resume to train from the start, or point --out at the interrupted run."
        )
    if not resume and any(ckpt.glob("checkpoint-*")):
        raise ValueError(
            f"out_dir={str(out)!r} holds checkpoints of an unfinished run ({ckpt}): pass --resume "
            "(resume: true) to continue it, or another --out / delete the folder to start over."
        )
    return found


def _ir_evaluator(
    queries: dict[str, str],
    corpus: dict[str, str],
    relevant: dict[str, set[str]],
    sizes: Sequence[int],
    batch_size: int,
) -> Any:
    """One ``InformationRetrievalEvaluator`` per size (``truncate_dim``), named ``dim_<m>``, in a
    ``SequentialEvaluator`` whose main score is the largest size's nDCG@10."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
    )

    per_size = [
        InformationRetrievalEvaluator(
            dict[str, Any](queries),
            dict[str, Any](corpus),
            relevant,
            mrr_at_k=[10],
            ndcg_at_k=[10],
            accuracy_at_k=[1],
            precision_recall_at_k=[10, 100],
            map_at_k=[100],
            batch_size=batch_size,
            name=f"dim_{m}",
            write_csv=False,
            truncate_dim=m,
        )
        for m in sorted(sizes)
    ]
    return SequentialEvaluator(per_size)


def _eval_set(config: TextTrainConfig) -> Any:
    """The evaluator of ``config.eval_data`` (``None`` without one): queries are the anchors
    and the corpus every distinct positive and negative text, or a BEIR folder's dev split."""
    if config.eval_data is None:
        return None
    from matryoshka.data.beir import is_beir_folder, load_beir
    from matryoshka.data.pairs import load_pairs

    if is_beir_folder(config.eval_data):
        beir = load_beir(config.eval_data, "dev")
        queries = dict(zip(beir.query_ids, beir.queries, strict=True))
        corpus = dict(zip(beir.corpus_ids, beir.corpus, strict=True))
        relevant = {q: {d for d, g in docs.items() if g > 0} for q, docs in beir.qrels.items()}
    else:
        ds = load_pairs(config.eval_data, config.columns, what="eval_data")
        doc_id: dict[str, str] = {}
        for col in ds.column_names[1:]:
            for text in ds[col]:
                doc_id.setdefault(text, f"d{len(doc_id)}")
        queries = {f"q{i}": a for i, a in enumerate(ds["anchor"])}
        corpus = {i: t for t, i in doc_id.items()}
        relevant = {f"q{i}": {doc_id[p]} for i, p in enumerate(ds["positive"])}
    return _ir_evaluator(queries, corpus, relevant, config.sizes, config.batch_size)


def _run_trainer(
    model: SentenceTransformer,
    dataset: Dataset,
    loss: FusedMatryoshkaLoss,
    args: Any,
    evaluator: Any = None,
    resume_from: Path | None = None,
) -> Any:
    """``SentenceTransformerTrainer(...).train()``; returns the trainer."""
    from sentence_transformers import SentenceTransformerTrainer

    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, evaluator=evaluator
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


# --- fine-tuning on in-memory pairs (the evaluation's baselines, and the 2D loop) -----------------


def finetune(
    encoder: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    nesting: Nesting,
    matryoshka: bool = True,
    batch_size: int = 32,
    lr: float = 2e-5,
    epochs: int = 1,
    temperature: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    n_sizes_per_step: int | None = None,
    layers: Sequence[int] | None = None,
) -> TextEncoder:
    """Fine-tune a copy of ``encoder`` on (anchor, positive) pairs with in-batch negatives.

    ``anchors[i]`` and ``positives[i]`` are a pair (at least 2 pairs); each step embeds
    ``batch_size`` of them to ``(B, d)``, ``d = nesting.dim``, and every other positive of the
    batch is a negative. ``matryoshka=True``: the fused Matryoshka loss over all sizes of
    ``nesting``; ``False``: the same loss at the full size only (a plain model, truncated later).
    Runs ``SentenceTransformerTrainer`` with :func:`build_loss` (no checkpoints). Returns the
    copy, in eval mode; ``encoder`` is left unchanged.
    ``n_sizes_per_step``: train a random subset of that many sizes each step (seeded).
    ``layers``: the 2D variant, prefix of layers x prefix of dims
    (:class:`~matryoshka.losses.contrastive.Matryoshka2dContrastiveLoss` on the mean-pooled output
    of those layers, ``(len(layers), B, d)``, 0-based; the last entry must be the model's last
    layer), trained by a hand-written AdamW loop: a sentence-transformers loss sees only the
    final embedding.
    """
    from matryoshka.data.pairs import pairs_from_lists
    from matryoshka.models.text_encoder import TextEncoder

    if len(anchors) != len(positives) or len(anchors) < 2:
        raise ValueError(
            f"anchors has {len(anchors)} texts and positives {len(positives)}: pass at least "
            "2 pairs, the same number of each."
        )
    model = TextEncoder(copy.deepcopy(encoder.model), name=f"{encoder.name}-ft")
    if layers is not None:
        return _finetune_2d(
            model,
            anchors,
            positives,
            nesting,
            matryoshka,
            batch_size,
            lr,
            epochs,
            temperature,
            seed,
            progress,
            n_sizes_per_step,
            layers,
        )
    loss = build_loss(model.model, nesting.sizes, matryoshka, temperature, n_sizes_per_step)
    with tempfile.TemporaryDirectory(prefix="mrl-finetune-") as tmp:
        args = _training_arguments(
            tmp,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
            save=False,
        )
        _run_trainer(model.model, pairs_from_lists(anchors, positives), loss, args)
    model.model.eval()
    return model


def _finetune_2d(
    model: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    nesting: Nesting,
    matryoshka: bool,
    batch_size: int,
    lr: float,
    epochs: int,
    temperature: float,
    seed: int,
    progress: bool,
    n_sizes_per_step: int | None,
    layers: Sequence[int],
) -> TextEncoder:
    """The 2D loop of :func:`finetune` on ``model`` (already a copy); trains it in place."""
    import torch
    from tqdm.auto import tqdm

    from matryoshka.losses.contrastive import Matryoshka2dContrastiveLoss
    from matryoshka.nesting import Nesting

    ladder = nesting if matryoshka else Nesting([nesting.dim])
    last = model.n_layers - 1
    if not layers or list(layers)[-1] != last:
        raise ValueError(
            f"layers={list(layers)} must end at the model's last layer ({last}, 0-based) so "
            f"the full model is trained, e.g. layers=[{max(0, last - 2)}, {last}]."
        )
    loss_fn = Matryoshka2dContrastiveLoss(
        ladder, list(layers), temperature=temperature, n_sizes_per_step=n_sizes_per_step
    )
    torch.manual_seed(seed)  # the size (and layer) sampling draws from torch's global RNG
    opt = torch.optim.AdamW(model.model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.model.train()
    steps = max(1, len(anchors) // batch_size)  # fewer pairs than batch_size: one smaller batch
    bar = tqdm(total=epochs * steps, desc="fine-tune 2D", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(anchors), generator=gen).tolist()
        for s in range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            fa = model.tokenize([anchors[i] for i in idx])
            fp = model.tokenize([positives[i] for i in idx])
            out = loss_fn(model.forward_layers(fa), model.forward_layers(fp))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    bar.close()
    model.model.eval()
    return model


def sample_pairs(train: Sequence[Synset], n: int, seed: int) -> list[Synset]:
    """A seeded sample of at most ``n`` training synsets, in their input order (the file order
    puts every noun first, so a plain prefix would hold nouns only)."""
    pick = np.random.default_rng(seed).permutation(len(train))[:n]
    return [train[i] for i in sorted(pick.tolist())]


# --- mrl train ------------------------------------------------------------------------------------


def _training_pairs(config: TextTrainConfig) -> tuple[Dataset, dict[str, Any]]:
    """The training ``Dataset`` (anchor, positive[, negative...]) and a description of it."""
    from matryoshka.data.pairs import load_pairs, pairs_from_lists

    if config.data is not None:
        ds = load_pairs(config.data, config.columns)
        return ds, {"source": config.data, "columns": config.columns, "rows": len(ds)}
    from matryoshka.data.wordnet import load_synsets, wordnet_split

    train, _ = wordnet_split(
        load_synsets(config.wordnet_root), config.seed, config.train_fraction, config.test_fraction
    )
    pairs = sample_pairs(train, config.train_pairs, config.seed)
    ds = pairs_from_lists([s.definition for s in pairs], [s.lemma_text for s in pairs])
    return ds, {"source": "wordnet (definition, lemmas)", "rows": len(ds)}


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``: readers see the old folder or the whole new
    one, never a half-written one (the old one is renamed aside first, then deleted)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _card(model: SentenceTransformer, base: str, sizes: Sequence[int], loss: str) -> None:
    """Name the loss and the trained sizes in the model card sentence-transformers writes."""
    data = model.model_card_data
    data.model_name = (
        f"{base} fine-tuned with {loss} (Matryoshka sizes {', '.join(map(str, sizes))})"
    )
    data.add_tags(["matryoshka", f"loss:{loss}"])
    if "generated_from_trainer" not in data.tags:
        # trained outside the trainer (the 2D loop): sentence-transformers would copy the base
        # model's README; have it generate a card from the data above instead
        model._model_card_text = None


def _save_run(
    model: SentenceTransformer, out: Path, meta: dict[str, Any], base: str, loss: str
) -> None:
    """Write ``out/model`` (atomically, as a whole folder) and then ``out/text_model.json``."""
    _card(model, base, meta["sizes"], loss)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make model/ private to this user
    try:
        model.save(str(tmp))
        _replace_folder(tmp, out / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(out / TEXT_MODEL_FILE, json.dumps(meta, indent=2).encode())


def train_text(config: TextTrainConfig) -> Path:
    """Fine-tune, save ``out_dir/model`` and ``out_dir/text_model.json``; returns the folder.

    Raises ``ValueError`` naming ``sizes`` right after the encoder loads when the ladder does not
    end at the model's dimension, naming ``resume`` / ``out_dir`` when there is nothing to resume
    or an unfinished run would be overwritten, naming ``data`` / ``columns`` for bad pairs, and
    naming ``layers`` when a 2D run's last layer is not the model's last one; nothing is written
    then. Under ``torchrun`` every process trains and the first one writes the folder.
    """
    from matryoshka.models.text_encoder import TextEncoder
    from matryoshka.nesting import Nesting

    t0 = time.time()
    base = TextEncoder(config.model)
    nesting = Nesting(list(config.sizes))
    check_sizes_match_model(nesting, base)  # before the data, the split and training
    out = Path(config.out_dir)
    if config.layers is not None and config.resume:
        raise ValueError(
            "resume=True with layers: the 2D loop writes no checkpoints; drop --resume (or "
            "layers to train with the trainer)."
        )
    resume_from = _resume_from(out, config.resume) if config.layers is None else None
    dataset, data_info = _training_pairs(config)
    meta: dict[str, Any] = {
        "format": TEXT_MODEL_FORMAT,
        "config": dataclasses.asdict(config),
        "base_model": base.name,
        # a local base model, absolute: `mrl eval` may run from another folder
        "base_model_path": (
            str(Path(config.model).resolve())
            if config.model is not None and Path(config.model).exists()
            else None
        ),
        "sizes": list(nesting.sizes) if config.matryoshka else [nesting.dim],
        "data": data_info,
        "train_pairs": len(dataset),
    }
    if config.layers is not None:
        if len(dataset.column_names) > 2:
            raise ValueError(
                f"data={config.data!r} has hard negatives ({dataset.column_names[2:]}) but the 2D "
                "loop (layers) trains (anchor, positive) pairs only: drop the negative columns "
                "with columns: [anchor, positive], or drop layers."
            )
        tuned = finetune(
            base,
            list(dataset["anchor"]),
            list(dataset["positive"]),
            nesting,
            matryoshka=config.matryoshka,
            batch_size=config.batch_size,
            lr=config.lr,
            epochs=config.epochs,
            temperature=config.temperature,
            seed=config.seed,
            progress=config.progress,
            n_sizes_per_step=config.n_sizes_per_step,
            layers=config.layers,
        )
        loss_name = "Matryoshka2dContrastiveLoss"
        meta["loss"] = {
            "name": loss_name,
            "module": "matryoshka.losses.contrastive",
            "matryoshka_dims": meta["sizes"],
            "layers": config.layers,
            "temperature": config.temperature,
            "n_sizes_per_step": config.n_sizes_per_step,
        }
        meta["trainer"] = "matryoshka.training.text.finetune (2D loop)"
        meta["train_seconds"] = round(time.time() - t0, 1)
        _save_run(tuned.model, out, meta, base.name, loss_name)
        return out
    model = base.model
    loss = build_loss(
        model, nesting.sizes, config.matryoshka, config.temperature, config.n_sizes_per_step
    )
    evaluator = _eval_set(config)
    args = _training_arguments(
        out / CHECKPOINTS,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        progress=config.progress,
        save=True,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        evaluate=evaluator is not None,
    )
    trainer = _run_trainer(model, dataset, loss, args, evaluator, resume_from)
    if not trainer.is_world_process_zero():
        return out
    loss_name = type(loss).__name__
    meta["loss"] = {"name": loss_name, "module": type(loss).__module__, **loss.get_config_dict()}
    meta["trainer"] = "sentence_transformers.SentenceTransformerTrainer"
    meta["steps"] = int(trainer.state.global_step)
    meta["resumed_from"] = str(resume_from) if resume_from else None
    meta["bf16"] = bool(args.bf16)
    if evaluator is not None:
        meta["eval"] = {k: float(v) for k, v in evaluator(model).items()}
    meta["train_seconds"] = round(time.time() - t0, 1)
    _save_run(model, out, meta, base.name, loss_name)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the run is finished: model/ is it
    return out
