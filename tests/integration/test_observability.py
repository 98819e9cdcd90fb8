"""Observability: Prometheus metrics, structured logs, `status --metrics`, `health`, env config."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from _ps_helpers import REPO_ROOT, drain_json_log, json_log_events, running_server

from adamax_client import InvalidArgumentError, RemoteAdamax, StaleGradientError
from adamax_server.cli import commands as cli
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.ops.logging_setup import configure_logging
from adamax_server.ops.metrics import ServerMetrics
from adamax_server.cli.status_view import format_summary, summarize


@pytest.fixture()
def observed():
    metrics = ServerMetrics()
    coordinator = Coordinator(device="cpu", observer=metrics)
    with running_server(coordinator=coordinator, metrics=metrics) as (target, _):
        port = metrics.serve_http(0, "127.0.0.1")
        try:
            yield target, metrics, f"127.0.0.1:{port}"
        finally:
            metrics.close()


def _scrape(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _value(text, sample):
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in metrics")


def test_metrics_count_pushes_bytes_latency_rejections_rounds_and_clipping(observed):
    target, metrics, address = observed
    with RemoteAdamax(target, name="a", worker_id="w0", clipnorm=1.0, max_staleness=0, bulk="off") as remote:  # gRPC method labels
        remote.build({"w": np.zeros(4, np.float32)})
        remote.apply([np.full(4, 10.0, np.float32)])  # norm 20 > clipnorm: clipped
        remote.pull()
        remote.apply([np.full(4, 0.1, np.float32)])  # norm 0.2: not clipped
        remote.pull()
        with pytest.raises(InvalidArgumentError):
            remote.apply([np.full(4, np.nan, np.float32)])
        with pytest.raises(StaleGradientError):
            remote.push([np.ones(4, np.float32)], step=0)
    with RemoteAdamax(target, name="s", worker_id="w0", mode="sync", num_workers=3, min_workers=2) as w0, \
            RemoteAdamax(target, name="s", worker_id="w1", mode="sync", num_workers=3, min_workers=2) as w1, \
            RemoteAdamax(target, name="s", worker_id="w2", mode="sync", num_workers=3, min_workers=2) as w2:
        w0.build({"w": np.zeros(2, np.float32)})
        w1.attach()
        w2.attach()
        w0.push([np.ones(2, np.float32)])
        w1.push([np.ones(2, np.float32)])  # closes the round with 2 of 3: one straggler
        with pytest.warns(UserWarning, match="not applied"):
            w2.push([np.ones(2, np.float32)])  # late
    text = _scrape(address)
    assert _value(text, 'adamax_ps_pushes_total{optimizer="a",outcome="applied"}') == 2
    assert _value(text, 'adamax_ps_pushes_total{optimizer="s",outcome="dropped_late"}') == 1
    assert _value(text, 'adamax_ps_late_pushes_total{optimizer="s"}') == 1
    assert _value(text, 'adamax_ps_rejected_pushes_total{reason="InvalidArgument"}') == 1
    assert _value(text, 'adamax_ps_rejected_pushes_total{reason="StaleGradient"}') == 1
    assert _value(text, 'adamax_ps_iterations{optimizer="a"}') == 2
    assert _value(text, 'adamax_ps_iterations{optimizer="s"}') == 1
    assert _value(text, 'adamax_ps_apply_seconds_count{optimizer="a"}') == 2
    assert _value(text, 'adamax_ps_clipped_applies_total{optimizer="a"}') == 1
    assert _value(text, 'adamax_ps_clip_rate{optimizer="a"}') == 0.5
    assert _value(text, 'adamax_ps_gradient_norm_sum{optimizer="a"}') == pytest.approx(20.0 + 0.2, rel=1e-6)
    assert _value(text, 'adamax_ps_round_wait_seconds_count{optimizer="s"}') == 1
    assert _value(text, 'adamax_ps_stragglers_total{optimizer="s"}') == 1
    assert _value(text, 'adamax_ps_received_bytes_total{method="Push"}') > 5 * 16
    assert _value(text, 'adamax_ps_sent_bytes_total{method="Pull"}') >= 16
    assert _value(text, 'adamax_ps_rpcs_total{code="INVALID_ARGUMENT",method="Push"}') == 1
    metrics.observe_checkpoint(0.25, 4096)
    summary = summarize(_scrape(address))
    assert summary["pushes"]["applied"] == 2 and summary["rejected"] == {"InvalidArgument": 1.0, "StaleGradient": 1.0}
    assert summary["clip_rate"] == {"a": 0.5, "s": 0.0} and summary["stragglers"] == 1 and summary["checkpoints"] == 1
    text = format_summary(summary)
    assert "pushes: accepted=1, applied=2, dropped_late=1, round_closed=1" in text
    assert "rejected pushes: InvalidArgument=1, StaleGradient=1" in text and "clip rate: a=50.0%, s=0.0%" in text


def test_status_command_shows_the_metrics_at_a_glance(observed, capsys):
    target, _, address = observed
    with RemoteAdamax(target, name="a", worker_id="w0") as remote:
        remote.build({"w": np.zeros(4, np.float32)})
        remote.apply([np.ones(4, np.float32)])
    assert cli.main(["status", "--target", target, "--metrics", address]) == 0
    out = capsys.readouterr().out
    assert "a: mode=async built=True version=1" in out and "pushes: applied=1" in out and "apply latency" in out
    assert cli.main(["status", "--target", target, "--metrics", address, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["optimizers"][0]["iterations"] == 1 and data["metrics"]["pushes"] == {"applied": 1.0}


def test_json_logs_carry_optimizer_worker_and_version(observed):
    target, _, _ = observed
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json", stream)
        with RemoteAdamax(target, name="a", worker_id="w7") as remote:
            remote.build({"w": np.zeros(2, np.float32)})
            with pytest.raises(InvalidArgumentError):
                remote.push([np.full(2, np.inf, np.float32)])
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    rejected = [e for e in entries if e["message"].startswith("push rejected")]
    assert rejected and rejected[0]["optimizer"] == "a" and rejected[0]["worker"] == "w7" and rejected[0]["version"] == 0
    assert rejected[0]["level"] == "INFO" and rejected[0]["reason"] == "InvalidArgument"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMAX_PS_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "server"), str(REPO_ROOT / "client"), str(REPO_ROOT / "wire"), os.environ.get("PYTHONPATH", "")]
    )
    env.update(extra)
    return env


def test_health_command_and_configuration_from_the_environment():
    """What the Docker image does: serve configured by env only, HEALTHCHECK via `adamax-ps health`."""
    env = _env(ADAMAX_PS_PORT="0", ADAMAX_PS_DEVICE="cpu", ADAMAX_PS_METRICS_PORT="0", ADAMAX_PS_METRICS_HOST="127.0.0.1",
               ADAMAX_PS_NO_REFLECTION="1", ADAMAX_PS_LOG_FORMAT="json", ADAMAX_PS_GRACE="1", ADAMAX_PS_BOGUS="1")
    proc = subprocess.Popen([sys.executable, "-m", "adamax_server.cli", "serve", "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events, early = json_log_events(proc, ("listening", "metrics"))  # JSON logs: no plain lines
        target = f"127.0.0.1:{events['listening']['port']}"
        metrics_address = f"{events['metrics']['host']}:{events['metrics']['port']}"
        health = subprocess.run([sys.executable, "-m", "adamax_server.cli", "health", "--address", target],
                                env=_env(), capture_output=True, text=True, timeout=30)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
        assert "adamax_ps_rpcs" in _scrape(metrics_address)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    stderr = "".join(early + drain_json_log(proc))
    assert "ADAMAX_PS_BOGUS is not a setting" in stderr
    assert all(json.loads(line) for line in stderr.splitlines() if line.strip())  # every log line is JSON
    down = subprocess.run([sys.executable, "-m", "adamax_server.cli", "health", "--address", target, "--timeout", "1"],
                          env=_env(), capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("ADAMAX_PS_PORT", "6000")
    monkeypatch.setenv("ADAMAX_PS_MAX_CONCURRENT_RPCS", "7")
    args = cli.build_parser().parse_args(["serve", "--port", "5000"])
    assert args.port == 5000 and args.max_concurrent_rpcs == 7
    args = cli.build_parser().parse_args(["serve"])
    assert args.port == 6000
