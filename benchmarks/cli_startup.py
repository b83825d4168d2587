"""Start-up time of the ``mrl`` command line: ``mrl --help`` and ``mrl <command> --help``.

    python benchmarks/cli_startup.py [--repeats 5] [--json results/cli_startup.json]

Each command runs in a fresh interpreter (``python -m matryoshka.cli ...``), ``--repeats`` times;
the table gives the best and the median wall time and which heavy libraries the command imported
(from ``-X importtime``). Help should take well under 1.5 s: the command table imports only the
module of the command asked for, and torch only where the flags come from a torch module. The
machine's load changes the absolute times: read them beside ``python -c pass``, printed first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ["--help"],
    ["train", "--help"],
    ["eval", "--help"],
    ["demo", "--help"],
    ["index", "build", "--help"],
    ["search", "--help"],
    ["embed", "--help"],
    ["adaptor", "fit", "--help"],
    ["text-eval", "--help"],
    ["serve", "--help"],
    ["app", "--help"],
    ["app", "rl", "--help"],
    ["embed-images", "--help"],
    ["--version"],
)
HEAVY = ("torch", "numpy", "faiss", "sentence_transformers", "fastapi", "uvicorn")


def _time(argv: list[str], repeats: int) -> tuple[list[float], list[str]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    log = subprocess.run([*argv[:1], "-X", "importtime", *argv[1:]], capture_output=True, text=True)
    top = {line.rsplit("|", 1)[-1].strip() for line in log.stderr.splitlines()}
    return times, [m for m in HEAVY if m in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    base, _ = _time([sys.executable, "-c", "pass"], args.repeats)
    print(f"{'command':<28} {'best s':>7} {'median s':>9}  heavy imports")
    print(f"{'(python -c pass)':<28} {min(base):>7.3f} {statistics.median(base):>9.3f}")
    for cmd in COMMANDS:
        times, heavy = _time([sys.executable, "-m", "matryoshka.cli", *cmd], args.repeats)
        name = "mrl " + " ".join(cmd)
        rows.append(
            {
                "command": name,
                "best_s": min(times),
                "median_s": statistics.median(times),
                "heavy": heavy,
            }
        )
        print(
            f"{name:<28} {min(times):>7.3f} {statistics.median(times):>9.3f}  {', '.join(heavy) or '-'}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"python_startup_s": min(base), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
