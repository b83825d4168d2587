"""Write the demo's table into README.md from a ``metrics.json`` (``make figures`` runs it).

    python tools/readme_tables.py [--results runs/demo/metrics.json] [--readme README.md]

The table and the run line (wall time, peak RSS, threads) between the markers
``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->`` are replaced by what the run
recorded, so the README shows exactly what a fresh ``make demo`` (seed 0) printed. Run
``--check`` to fail (exit 1) when the README differs from the results instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def _best_posthoc(metric: dict[str, list[float]], i: int) -> float:
    return max(v[i] for name, v in metric.items() if " + " in name)


def demo_table(results: dict[str, Any], machine: str = "idle") -> str:
    """The README's demo table (test-split %, one row per size) and the run line above it;
    ``machine`` says what else the machine was doing (the wall time depends on it)."""
    m, meta, sizes = results["metrics"], results["meta"], results["sizes"]
    full = sizes[-1]
    head = (
        f"| m | top-1 MRL | top-1 MRL-E | top-1 FF | probe MRL | probe FF-{full} + PCA | 1-NN MRL "
        "| 1-NN best post-hoc | mAP@10 MRL | mAP@10 best post-hoc |"
    )
    rows = [head, "|---:|" + "---:|" * 9]
    for i, size in enumerate(sizes):
        cells = [
            m["top1"]["MRL"][i],
            m["top1"]["MRL-E"][i],
            m["top1"]["FF"][i],
            m["probe"]["MRL"][i],
            m["probe"][f"FF-{full} + pca"][i],
            m["knn1"]["MRL"][i],
            _best_posthoc(m["knn1"], i),
            m["map@10"]["MRL"][i],
            _best_posthoc(m["map@10"], i),
        ]
        rows.append(f"| {size} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |")
    wall = meta["wall_seconds"]
    line = (
        f"Measured here (`make demo`, seed 0, {meta['threads']} torch threads, machine {machine}): "
        f"**{int(wall // 60)} min {round(wall % 60)} s wall, {meta['peak_rss_mib'] / 1024:.2f} GB "
        "peak RSS** (times vary with the machine's load; the numbers do not: two runs with the "
        "same seed write identical metrics). Test-split numbers (%), from `runs/demo/report.md`:"
    )
    return f"{line}\n\n" + "\n".join(rows)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the demo-table markers replaced by ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} ... {END} block: add the two markers.")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{block}\n{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("runs/demo/metrics.json"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the README differs")
    parser.add_argument(
        "--machine", default="idle", help="what else the machine was doing during the run"
    )
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    text = args.readme.read_text()
    new = replace_block(text, demo_table(results, args.machine))
    if args.check:
        same = new == text
        print("README demo table matches" if same else "README demo table differs from the run")
        return 0 if same else 1
    args.readme.write_text(new)
    print(f"wrote the demo table of {args.results} into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
