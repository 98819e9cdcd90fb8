"""The ``adamax-ps`` CLI: serve logs its address, status lists optimizers of a running server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

from _ps_helpers import REPO_ROOT

from adamax_client import RemoteAdamax
from adamax_server.cli import commands as cli


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "server"), str(REPO_ROOT / "client"), str(REPO_ROOT / "wire"), env.get("PYTHONPATH", "")])
    return env


def test_serve_then_status_then_sigterm(capsys):
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        target = line.split()[-1]
        with RemoteAdamax(target, worker_id="cli-worker", name="cli", learning_rate=0.01) as remote:
            remote.build({"w": np.zeros(3, np.float32)})
            remote.apply([np.ones(3, np.float32)])
        assert cli.main(["status", "--target", target]) == 0
        out = capsys.readouterr().out
        assert "cli: mode=async built=True version=1 iterations=1" in out and "worker cli-worker" in out
        assert cli.main(["status", "--target", target, "--json"]) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr = proc.stderr.read()
    assert "adamax-ps listening on 127.0.0.1:" in stderr


def test_status_of_an_unreachable_server_fails_cleanly(capsys):
    assert cli.main(["status", "--target", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert "error: 127.0.0.1:1" in capsys.readouterr().err


def test_demo_hook_reports_a_missing_demo(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "adamax_server.cli.demo", None)
    assert cli.main(["demo", "--steps", "1"]) == 2
    assert "demo is not available" in capsys.readouterr().err
