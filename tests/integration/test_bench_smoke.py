"""Smoke test of the measurement suite: every benchmark runs at --quick size and writes JSON and PNG.

No timing assertions: the figures depend on the machine; only that each benchmark runs to the
end and leaves strict JSON and a PNG behind. One goes through ``adamax-ps bench`` (the CLI
hook, in a subprocess); the others call the benchmark's ``main`` in this process, which saves
an interpreter start each (they spawn their own servers and workers either way).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "server"))

from adamax_server.cli.bench import BENCHMARKS, benchmarks_dir  # noqa: E402

pytestmark = pytest.mark.skipif(benchmarks_dir() is None, reason="benchmarks/ is not in this installation")


def _check_outputs(directory: Path, name: str, printed: str) -> None:
    result = json.loads((directory / f"{name}.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert result["rows"] and set(result["columns"]) <= set().union(*result["rows"])
    assert (directory / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["title"] in printed  # the table was printed too


def test_cli_bench_runs_a_benchmark(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"), str(ROOT / "wire"), env.get("PYTHONPATH", "")])
    env.setdefault("MPLBACKEND", "Agg")
    done = subprocess.run(
        [sys.executable, "-m", "adamax_server.cli", "--log-level", "WARNING", "bench", "overlap", "--quick",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_outputs(tmp_path, "overlap", done.stdout)


@pytest.mark.parametrize("name", [b for b in BENCHMARKS if b != "overlap"])
def test_benchmark_runs_quick_and_writes_json_and_png(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(benchmarks_dir()))
    module = importlib.import_module(f"bench_{name}")
    code = module.main(["--quick", "--json", str(tmp_path / f"{name}.json"), "--png", str(tmp_path / f"{name}.png")])
    assert code == 0
    _check_outputs(tmp_path, name, capsys.readouterr().out)
