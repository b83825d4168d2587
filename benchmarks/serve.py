"""Load test of `mrl serve` on loopback, with and without dynamic batching.

    python benchmarks/serve.py                       # 16 clients, 20 s per mode
    python benchmarks/serve.py --clients 32 --duration 30 --texts-per-request 1

For each mode a server is started in a subprocess on 127.0.0.1 (a free port), warmed up, then
``--clients`` concurrent clients send ``POST /v1/embeddings`` (``--dimensions``, one short text
each by default) back to back for ``--duration`` seconds, and the server is stopped. Reported:
requests/s, texts/s, p50/p99 latency, errors (must be 0), and the mean requests merged into one
encoder call (from the server's /metrics). A table goes to stdout and JSON to results/serve.json.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

WORDS = [
    "cat",
    "dog",
    "tree",
    "river",
    "stone",
    "cloud",
    "house",
    "music",
    "light",
    "paper",
    "window",
    "garden",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, batching: bool, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """Start `matryoshka.serve.run` in a subprocess and wait until /health answers."""
    code = (
        "from matryoshka.serve import ServeConfig, run; "
        f"run(ServeConfig(port={port}, batching={batching}, max_wait_ms={args.max_wait_ms}, "
        f"max_batch_size={args.max_batch_size}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not answer /health within 120 s")


def metric(text: str, name: str) -> float:
    """A metric without labels from the Prometheus text."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split(" ")[1])
    raise KeyError(name)


async def load(url: str, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """``args.clients`` clients sending requests back to back for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        rng = np.random.default_rng(i)
        while time.perf_counter() < stop:
            texts = [
                " ".join(rng.choice(WORDS, size=8).tolist()) for _ in range(args.texts_per_request)
            ]
            body = {"input": texts, "dimensions": args.dimensions, "encoding_format": "base64"}
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/embeddings", json=body)
                ok = r.status_code == 200 and len(r.json()["data"]) == len(texts)
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "seconds": wall,
        "requests_per_s": n / wall,
        "texts_per_s": n * args.texts_per_request / wall,
        "p50_ms": float(np.percentile(lat, 50)) if n else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if n else float("nan"),
    }


def run_mode(batching: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Start a server, warm it up, load it, read its metrics, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, batching, args)
    try:
        asyncio.run(load(url, args, args.warmup))
        before = httpx.get(url + "/metrics").text
        result = asyncio.run(load(url, args, args.duration))
        after = httpx.get(url + "/metrics").text
        calls = metric(after, "mrl_encoder_calls_total") - metric(before, "mrl_encoder_calls_total")
        result["encoder_calls"] = int(calls)
        result["requests_per_encoder_call"] = result["requests"] / max(calls, 1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"batching": batching, **result}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (8-32 typical)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--dimensions", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--out", default="results/serve.json")
    args = p.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.duration <= 600:
        p.error("--clients must be in [1, 256] and --duration in (0, 600] seconds")

    rows = [run_mode(b, args) for b in (False, True)]
    head = f"{'batching':>9} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
    head += f"{'errors':>7} {'req/call':>9}"
    print(f"\n{args.clients} clients, {args.duration:g} s, {args.texts_per_request} text(s)/request, "
          f"dimensions={args.dimensions}, {os.cpu_count()} CPUs")  # fmt: skip
    print(head)
    for r in rows:
        print(
            f"{'on' if r['batching'] else 'off':>9} {r['requests_per_s']:8.1f} "
            f"{r['texts_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d} "
            f"{r['requests_per_encoder_call']:9.2f}"
        )
    speedup = rows[1]["requests_per_s"] / max(rows[0]["requests_per_s"], 1e-9)
    print(f"dynamic batching: {speedup:.2f}x the requests/s of one encoder call per request")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "clients": args.clients,
        "duration_s": args.duration,
        "texts_per_request": args.texts_per_request,
        "dimensions": args.dimensions,
        "max_wait_ms": args.max_wait_ms,
        "max_batch_size": args.max_batch_size,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    out.write_text(json.dumps({"config": meta, "results": rows, "speedup": speedup}, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
