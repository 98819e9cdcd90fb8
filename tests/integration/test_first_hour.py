"""A new user's first hour with ``adamax-ps``: mistakes get clear messages, not tracebacks or surprises.

Servers run as real ``adamax-ps serve`` processes on 127.0.0.1 port 0 and are stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMAX_PS_")}
    env["PYTHONPATH"] = os.pathsep.join(str(REPO_ROOT / p) for p in ("server", "client", "wire"))
    env.update(extra)
    return env


def _cli(*args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adamax_server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float = 30.0) -> str:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no '{prefix}' line within {timeout} s; stdout: {seen}; exit {proc.poll()}")


@contextmanager
def serving(*flags: str, **env: str) -> Iterator[str]:
    """``adamax-ps serve --port 0 FLAGS`` running; yields its target; SIGTERM at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "cpu", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env),
    )
    try:
        line = _read_until(proc, "listening on ")
        yield line.split()[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


# ---------------------------------------------------------------- 11, 12: ports


def test_a_second_server_on_a_used_port_refuses_to_start() -> None:
    with serving() as target:
        port = target.rsplit(":", 1)[1]
        started = time.monotonic()
        second = _cli("serve", "--port", port, "--device", "cpu", "--no-bulk", timeout=30)
        assert second.returncode == 2, second
        assert "already in use" in second.stderr and port in second.stderr, second.stderr
        assert "listening" not in second.stdout
        _no_traceback(second)
        assert time.monotonic() - started < 20


def test_a_used_bulk_port_is_refused_too() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli("serve", "--port", "0", "--device", "cpu", "--bulk-port", str(port), timeout=30)
    assert proc.returncode == 2, proc
    assert "already in use" in proc.stderr and str(port) in proc.stderr, proc.stderr
    _no_traceback(proc)


@pytest.mark.parametrize("flag", ["--port", "--bulk-port", "--metrics-port"])
@pytest.mark.parametrize("value", ["-1", "70000", "65536"])
def test_port_numbers_out_of_range_are_refused(flag: str, value: str) -> None:
    proc = _cli("serve", flag, value, timeout=30)
    assert proc.returncode == 2, proc
    assert "0-65535" in proc.stderr or "0 and 65535" in proc.stderr, proc.stderr
    _no_traceback(proc)


def test_a_port_out_of_range_in_the_environment_is_refused() -> None:
    proc = _cli("serve", timeout=30, ADAMAX_PS_PORT="70000")
    assert proc.returncode == 2 and "ADAMAX_PS_PORT" in proc.stderr and "65535" in proc.stderr, proc.stderr
    _no_traceback(proc)


# ---------------------------------------------------------------- 13, 14: messages and flags


def test_upload_of_a_missing_directory_is_a_message(tmp_path: Path) -> None:
    with serving() as target:
        missing = tmp_path / "nonexistent"
        proc = _cli("checkpoint", "upload", "--input", str(missing), "--target", target)
    assert proc.returncode != 0
    _no_traceback(proc)
    assert "nonexistent" in proc.stderr and "error" in proc.stderr, proc.stderr
    assert not missing.exists()  # an upload never creates its input


def test_upload_of_an_empty_directory_is_a_message(tmp_path: Path) -> None:
    with serving() as target:
        proc = _cli("checkpoint", "upload", "--input", str(tmp_path), "--target", target)
    assert proc.returncode != 0
    _no_traceback(proc)
    assert "no checkpoints" in proc.stderr, proc.stderr


def test_unknown_log_level_is_a_usage_error() -> None:
    proc = _cli("--log-level", "LOUD", "status")
    assert proc.returncode == 2
    _no_traceback(proc)
    assert "LOUD" in proc.stderr and "DEBUG" in proc.stderr, proc.stderr
    env = _cli("status", ADAMAX_PS_LOG_LEVEL="LOUD")
    assert env.returncode == 2 and "ADAMAX_PS_LOG_LEVEL" in env.stderr, env.stderr
    _no_traceback(env)


def test_health_takes_target_and_address_is_a_deprecated_alias() -> None:
    with serving() as target:
        new = _cli("health", "--target", target)
        assert new.returncode == 0 and new.stdout.strip() == "SERVING", new
        old = _cli("health", "--address", target)
        assert old.returncode == 0 and old.stdout.strip() == "SERVING", old
        assert "deprecated" in old.stderr and "--target" in old.stderr


def test_global_flags_work_after_the_subcommand() -> None:
    with serving("--log-format", "text", "--log-level", "debug") as target:
        proc = _cli("status", "--target", target, "--log-level", "WARNING")
        assert proc.returncode == 0, proc
    proc = _cli("health", "--target", "127.0.0.1:1", "--log-format", "json", "--timeout", "1")
    assert proc.returncode == 1 and "unrecognized" not in proc.stderr, proc.stderr
    # after the command it wins over the environment, and before it still counts
    proc = _cli("serve", "--port", "-1", "--log-format", "json", ADAMAX_PS_LOG_FORMAT="text")
    assert proc.returncode == 2 and "unrecognized" not in proc.stderr, proc.stderr
    proc = _cli("--log-format", "json", "serve", "--device", "gpu" if not _gpu_available() else "cpu",
                "--port", "0", "--bulk-port", "-5")
    assert proc.returncode == 2 and "unrecognized" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["status"], ["health"], ["checkpoint", "list"]])
def test_target_help_shows_the_default(command: list[str]) -> None:
    proc = _cli(*command, "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--target" in text and "127.0.0.1:50051" in text, proc.stdout


# ---------------------------------------------------------------- 15: environment and bench help


SERVE_FLAGS_WITHOUT_ENV_BEFORE = ["--max-threads", "--chunk-mib", "--max-tensor-gib", "--max-optimizers",
                                  "--dedup-capacity"]


def test_every_serve_flag_has_an_environment_variable() -> None:
    sys.path[:0] = [str(REPO_ROOT / p) for p in ("server", "client", "wire")]
    from adamax_server.cli.commands import build_parser

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    helps = {}
    for action in serve._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--log-level", "--log-format"):
                helps[flag] = action.help or ""
    for flag in SERVE_FLAGS_WITHOUT_ENV_BEFORE:
        assert flag in helps
    missing = {f: h for f, h in helps.items() if "ADAMAX_PS_" + f[2:].replace("-", "_").upper() not in h}
    assert not missing, missing


def test_serve_limits_from_the_environment_take_effect() -> None:
    from adamax_client import RemoteAdamax
    from adamax_client.errors import AdamaxError

    with serving(ADAMAX_PS_MAX_OPTIMIZERS="1") as target:
        with RemoteAdamax(target, name="one", timeout=10):
            pass
        with pytest.raises(AdamaxError, match="(?i)optimizers"):
            RemoteAdamax(target, name="two", timeout=10)


def test_serve_help_lists_the_environment_names() -> None:
    text = " ".join(_cli("serve", "--help").stdout.split())
    for flag in SERVE_FLAGS_WITHOUT_ENV_BEFORE:
        assert "ADAMAX_PS_" + flag[2:].replace("-", "_").upper() in text, flag


def test_bench_name_help_is_the_benchmarks_own_help() -> None:
    if not (REPO_ROOT / "benchmarks" / "bench_transport.py").is_file():
        pytest.skip("no benchmarks/ in this checkout")
    proc = _cli("bench", "transport", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: adamax-ps bench transport" in proc.stdout, proc.stdout
    assert "--quick" in proc.stdout
    assert "``" not in proc.stdout  # no raw reST
    generic = _cli("bench", "--help")
    assert generic.returncode == 0 and "``" not in generic.stdout and "transport" in generic.stdout


# ---------------------------------------------------------------- 16: downloads of the live state


def test_download_of_the_live_state_does_not_reuse_a_server_checkpoint_id(tmp_path: Path) -> None:
    from adamax_client import RemoteAdamax
    from adamax_client.checkpoints import CheckpointClient

    with serving("--checkpoint-dir", str(tmp_path / "server")) as target:
        with RemoteAdamax(target, name="job", timeout=10) as opt, CheckpointClient(target, timeout=30) as ckpt:
            opt.build({"w": np.zeros(3, np.float32)})
            for _ in range(5):
                opt.push({"w": np.ones(3, np.float32)})
            first = ckpt.save().checkpoint_id
            for _ in range(3):
                opt.push({"w": np.ones(3, np.float32)})
            backup = tmp_path / "backup"
            proc = _cli("checkpoint", "download", "--output", str(backup), "--target", target, "--json")
            assert proc.returncode == 0, proc.stderr
            local = json.loads(proc.stdout)
            assert local["checkpoint_id"] != first, (local, first)
            assert [o["version"] for o in local["optimizers"]] == [8]
            server_ids = {c.checkpoint_id for c in ckpt.list()}
            assert local["checkpoint_id"] not in server_ids
            # a stored checkpoint keeps the id the server gave it
            proc = _cli("checkpoint", "download", first, "--output", str(backup), "--target", target, "--json")
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)["checkpoint_id"] == first


# ---------------------------------------------------------------- 17: connections


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_fails_fast_with_a_clear_error() -> None:
    from adamax_client import RemoteAdamax
    from adamax_client.errors import UnavailableError

    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}.*connection refused"):
        RemoteAdamax(f"127.0.0.1:{port}", name="x", timeout=30)
    assert time.monotonic() - started < 2.0
    started = time.monotonic()
    proc = _cli("status", "--target", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and "refused" in proc.stderr.lower(), proc.stderr
    _no_traceback(proc)
    assert time.monotonic() - started < 8.0  # interpreter start-up included


def test_a_target_without_a_port_goes_to_50051() -> None:
    from adamax_client.transport import Transport, normalize_target

    assert normalize_target("ps.internal") == "ps.internal:50051"
    assert normalize_target("127.0.0.1") == "127.0.0.1:50051"
    assert normalize_target("127.0.0.1:7000") == "127.0.0.1:7000"
    assert normalize_target("[::1]") == "[::1]:50051"
    assert normalize_target("::1") == "[::1]:50051"
    assert normalize_target("[::1]:7000") == "[::1]:7000"
    assert normalize_target("dns:///ps.internal:7000") == "dns:///ps.internal:7000"
    assert normalize_target("unix:/tmp/ps.sock") == "unix:/tmp/ps.sock"
    transport = Transport("localhost")
    try:
        assert transport.target == "localhost:50051"
    finally:
        transport.close()


def test_a_retry_policy_can_wait_for_a_server_that_is_not_up_yet() -> None:
    from adamax_client import RemoteAdamax, RetryPolicy
    from adamax_client.errors import UnavailableError

    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        RemoteAdamax(f"127.0.0.1:{port}", name="x", timeout=1.5,
                     retry=RetryPolicy(wait_for_server=True, max_backoff=0.2))
    assert time.monotonic() - started >= 1.0  # it kept trying until its deadline


# ---------------------------------------------------------------- 18: the demo's output


def test_demo_prints_no_resource_tracker_tracebacks() -> None:
    pytest.importorskip("sklearn")
    proc = _cli("demo", "--epochs", "1", "--workers", "2", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr
    assert "resource_tracker" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- json logs


def test_json_logs_have_no_plain_lines(tmp_path: Path) -> None:
    """With --log-format json every line the server writes (stdout and stderr) is one JSON object."""
    from adamax_client import RemoteAdamax

    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "cpu",
         "--checkpoint-dir", str(tmp_path), "--restore", "latest", "--metrics-port", "0", "--metrics-host",
         "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(ADAMAX_PS_LOG_FORMAT="json"),
    )
    lines = []
    try:
        deadline = time.monotonic() + 30
        target = None
        while target is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            entry = json.loads(line)
            if entry.get("event") == "listening":
                target = f"127.0.0.1:{entry['port']}"
        assert target, lines
        with RemoteAdamax(target, name="job", timeout=10) as opt:
            opt.build({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)})
            opt.push({"w": np.ones(3, np.float32)})  # b has no gradient: the server logs it
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    lines += out.splitlines()
    bad = []
    for line in (x for x in lines if x.strip()):
        try:
            entry = json.loads(line)
            assert {"ts", "level", "logger", "message"} <= entry.keys()
        except (ValueError, AssertionError):
            bad.append(line)
    assert not bad, bad
    messages = [json.loads(x)["message"] for x in lines if x.strip()]
    assert any("no gradient" in m for m in messages), messages
    assert not any("model.compile" in m for m in messages), messages


# ---------------------------------------------------------------- devices


def _gpu_available() -> bool:
    sys.path[:0] = [str(REPO_ROOT / p) for p in ("server", "client", "wire")]
    from adamax_server.optim.kernels import gpu_available

    return gpu_available()


def test_device_gpu_without_a_gpu_fails_at_start_up() -> None:
    if _gpu_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = _cli("serve", "--port", "0", "--device", "gpu", timeout=60)
    assert proc.returncode == 2, proc
    assert "no CUDA GPU" in proc.stderr and "--device" in proc.stderr, proc.stderr
    assert "listening" not in proc.stdout
    _no_traceback(proc)


def test_device_auto_without_a_gpu_serves_on_the_cpu_and_says_so() -> None:
    if _gpu_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "auto"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        _read_until(proc, "listening on ")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "no CUDA GPU" in err and "device=cpu" in err, err


# ---------------------------------------------------------------- health file


def test_health_reads_the_port_serve_bound_from_its_health_file(tmp_path: Path) -> None:
    health_file = tmp_path / "health.json"
    with serving(ADAMAX_PS_HEALTH_FILE=str(health_file)) as target:
        info = json.loads(health_file.read_text())
        assert info["port"] == int(target.rsplit(":", 1)[1])
        proc = _cli("health", ADAMAX_PS_HEALTH_FILE=str(health_file), ADAMAX_PS_PORT="1")
        assert proc.returncode == 0 and proc.stdout.strip() == "SERVING", proc
    assert not health_file.exists()  # removed on a clean stop
    proc = _cli("health", "--timeout", "1", ADAMAX_PS_HEALTH_FILE=str(health_file))
    assert proc.returncode == 1 and "health.json" in proc.stderr, proc.stderr


def test_a_shard_writes_its_health_file_too(tmp_path: Path) -> None:
    """The image's HEALTHCHECK (`adamax-ps health`, no flags) works for a shard of a sharded job."""
    import socket

    with socket.socket() as probe:  # a one-shard job needs its own address in the shard list
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    health_file = tmp_path / "health.json"
    with serving("--shard-index", "0", "--shards", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                 "--port", str(port), ADAMAX_PS_HEALTH_FILE=str(health_file)):
        deadline = time.monotonic() + 20
        while not health_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(health_file.read_text())
        assert (info["port"], info["shard_index"], info["num_shards"]) == (port, 0, 1), info
        proc = _cli("health", ADAMAX_PS_HEALTH_FILE=str(health_file))
        assert proc.returncode == 0 and proc.stdout.strip() == "SERVING", proc
    assert not health_file.exists()  # removed on a clean stop


def test_health_with_tls_from_the_environment(tmp_path: Path) -> None:
    """The server's TLS variables (ADAMAX_PS_TLS_CA is the *client* CA there) do not break `health`."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from _certs import make_pki

    pki = make_pki(tmp_path / "pki")
    health_file = tmp_path / "health.json"
    server_env = {"ADAMAX_PS_TLS_CERT": str(pki.server_cert), "ADAMAX_PS_TLS_KEY": str(pki.server_key),
                  "ADAMAX_PS_TLS_CA": str(pki.ca), "ADAMAX_PS_TLS_REQUIRE_CLIENT_CERT": "1",
                  "ADAMAX_PS_HEALTH_FILE": str(health_file)}
    with serving(**server_env) as target:
        inside = _cli("health", **server_env)  # what the image's HEALTHCHECK runs
        assert inside.returncode == 0 and inside.stdout.strip() == "SERVING", inside
        direct = _cli("health", "--target", target, "--tls-ca", str(pki.ca), "--tls-client-cert",
                      str(pki.client_cert), "--tls-client-key", str(pki.client_key))
        assert direct.returncode == 0 and direct.stdout.strip() == "SERVING", direct
        plain = _cli("health", "--target", target, "--timeout", "2")
        assert plain.returncode == 1


# ---------------------------------------------------------------- 19: server-side messages


def test_missing_gradients_are_logged_in_server_terms_once(caplog) -> None:
    import warnings as _warnings

    from _ps_helpers import running_server

    from adamax_client import RemoteAdamax

    with running_server() as (target, _), RemoteAdamax(target, name="job", timeout=10, bulk="off") as opt:
        opt.build({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)})
        with caplog.at_level("DEBUG", logger="adamax_server"), _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            for _ in range(3):
                opt.push({"w": np.ones(3, np.float32)})
    records = [r for r in caplog.records if "no gradient" in r.getMessage()]
    assert [r.levelname for r in records] == ["WARNING", "DEBUG", "DEBUG"], records
    assert "['b']" in records[0].getMessage() and "job" in records[0].getMessage()
    assert not any("model.compile" in r.getMessage() for r in caplog.records)
    assert not [w for w in caught if "model.compile" in str(w.message)]
