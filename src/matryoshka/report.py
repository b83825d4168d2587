"""Reports: per-size results as JSON, Markdown tables and PNG plots.

Every evaluator produces one results dict in this schema, and :func:`write_report` renders it::

    {
      "task": "MNIST subset, 10 classes",
      "sizes": [2, 4, 8],
      "metrics": {"top1": {"MRL": [0.61, 0.83, 0.95], "FF": [...]}, ...},  # one value per size
      "meta": {...},            # optional: anything JSON-ready (timings, config)
      "notes": ["..."],         # optional: findings in words, shown above the tables
      "metric_labels": {"top1": "top-1 accuracy"},  # optional
      "units": "episode returns",  # optional: values are printed as they are, in these units
      "curves": {"cascade": {"title": ..., "xlabel": ..., "ylabel": ..., "log2x": true,
                 "series": {"MRL cascade": {"x": [...], "y": [...]}, ...}}},  # optional
    }

Values may be ``null`` where a method has no result at a size. Without ``units`` they are
fractions, shown as percentages (a value in ``[-1, 1]`` is multiplied by 100).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["load_results", "plot_curve", "plot_metric", "validate_results", "write_report"]


def validate_results(results: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the first field that breaks the schema."""
    for key in ("task", "sizes", "metrics"):
        if key not in results:
            raise ValueError(f"results has no {key!r} field: see matryoshka.report's schema.")
    units = results.get("units")
    if units is not None and (not isinstance(units, str) or not units):
        raise ValueError(
            f"results['units']={units!r} must be a non-empty string such as 'episode returns', "
            "or absent for percentages."
        )
    sizes = results["sizes"]
    if not isinstance(sizes, list) or not sizes:
        raise ValueError(f"results['sizes']={sizes!r} must be a non-empty list of ints.")
    for metric, by_method in results["metrics"].items():
        for method, values in by_method.items():
            if len(values) != len(sizes):
                raise ValueError(
                    f"results['metrics'][{metric!r}][{method!r}] has {len(values)} values but "
                    f"there are {len(sizes)} sizes: give one value (or null) per size."
                )


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if abs(v) <= 1.0 else f"{v:.3g}"


def _fmt_raw(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}"


def line_axes() -> tuple[Any, Any]:
    """A ``(figure, axes)`` pair for a line plot, on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.2), dpi=120)


def save_line_plot(fig: Any, ax: Any, path: str | Path) -> Path:
    """Grid, legend and tight layout; write ``path`` (making its folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metric(results: dict[str, Any], metric: str, path: Path) -> Path:
    """One PNG: ``metric`` against size (log2 x axis), one line per method."""
    sizes = results["sizes"]
    label = results.get("metric_labels", {}).get(metric, metric)
    fig, ax = line_axes()
    for method, values in results["metrics"][metric].items():
        pts = [(s, v) for s, v in zip(sizes, values, strict=True) if v is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=4, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("representation size m (log2)")
    ax.set_ylabel(metric)
    ax.set_title(textwrap.fill(f"{results['task']}: {label}", 70), fontsize=9)
    return save_line_plot(fig, ax, path)


def plot_curve(curve: dict[str, Any], path: Path) -> Path:
    """One PNG of free-form series (``{"series": {label: {"x": [...], "y": [...]}}}``), e.g.
    accuracy against expected dimension for an adaptive cascade."""
    fig, ax = line_axes()
    for label, series in curve["series"].items():
        ax.plot(series["x"], series["y"], marker="o", ms=4, label=label)
    if curve.get("log2x"):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(curve.get("xlabel", ""))
    ax.set_ylabel(curve.get("ylabel", ""))
    ax.set_title(textwrap.fill(curve.get("title", ""), 70), fontsize=9)
    return save_line_plot(fig, ax, path)


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``metrics.json``, one ``<metric>.png`` per metric and ``report.md``; returns the
    Markdown path."""
    validate_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    sizes = results["sizes"]
    labels = results.get("metric_labels", {})
    lines = [f"# {results['task']}", ""]
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    if results.get("notes"):
        lines.append("")
    units = results.get("units")
    fmt = _fmt if units is None else _fmt_raw
    lines.append(
        f"Values are {units or 'percentages'} (rows: representation size; columns: methods)."
    )
    lines.append("")
    for metric, by_method in results["metrics"].items():
        png = plot_metric(results, metric, out / f"{metric.replace('@', '_at_')}.png")
        methods = list(by_method)
        lines += [f"## {labels.get(metric, metric)}", ""]
        lines.append("| m | " + " | ".join(methods) + " |")
        lines.append("|---:|" + "---:|" * len(methods))
        for i, m in enumerate(sizes):
            row = [fmt(by_method[meth][i]) for meth in methods]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines += ["", f"![{metric}]({png.name})", ""]
    for name, curve in results.get("curves", {}).items():
        png = plot_curve(curve, out / f"curve_{name}.png")
        lines += [f"## {curve.get('title', name)}", ""]
        for label, series in curve["series"].items():
            points = ", ".join(
                f"({x:.3g}, {fmt(y)})" for x, y in zip(series["x"], series["y"], strict=True)
            )
            lines.append(f"- {label}: {points}")
        lines += ["", f"![{name}]({png.name})", ""]
    meta = results.get("meta")
    if meta:
        lines += ["## Run", "", "```json", json.dumps(meta, indent=1), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` written by :func:`write_report` (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"results={str(path)!r} does not exist: pass a metrics.json or its folder."
        )
    results = json.loads(path.read_text())
    validate_results(results)
    return results
