"""The image of docker/Dockerfile on a real Docker engine: health, training through the published
ports, ``docker stop`` with its final checkpoint, restore after a restart or a ``docker kill``.

Workers run here on the host (the test process) and talk to the container through ports published
on 127.0.0.1: gRPC on a random host port, the bulk channel on the same port number inside and
outside (workers reach it on the gRPC host name at the port the server announces).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, Docker, docker, unique  # tests/docker/conftest.py

pytestmark = pytest.mark.docker

from adamax_client import RemoteAdamax, RetryPolicy  # noqa: E402


def _host_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``adamax-ps ARGS`` from this checkout, on the host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMAX_PS_")}
    env["PYTHONPATH"] = os.pathsep.join(str(REPO_ROOT / p) for p in ("server", "client", "wire"))
    return subprocess.run([sys.executable, "-m", "adamax_server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {"w": rng.standard_normal((16, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}


INITIAL = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4), "b": np.zeros(4, np.float32)}


def _optimizer(target: str, name: str, bulk: str = "auto", **kwargs) -> RemoteAdamax:
    return RemoteAdamax(target, name=name, learning_rate=0.01, timeout=30, bulk=bulk,
                        retry=RetryPolicy(max_attempts=20, max_backoff=1.0), **kwargs)


def _keras_weights(steps: range) -> dict[str, np.ndarray]:
    """What keras.optimizers.Adamax makes of INITIAL after the gradients of ``steps``."""
    import keras

    variables = {k: keras.Variable(v.copy(), name=k) for k, v in INITIAL.items()}
    opt = keras.optimizers.Adamax(learning_rate=0.01)
    order = list(variables)
    opt.build([variables[k] for k in order])
    for step in steps:
        grads = _grads(step)
        opt.apply([grads[k] for k in order], [variables[k] for k in order])
    return {k: np.asarray(v.numpy()) for k, v in variables.items()}


def _train(opt: RemoteAdamax, steps: range) -> dict[int, dict[str, np.ndarray]]:
    """Push the gradients of ``steps``; the weights after each (by version)."""
    seen = {}
    for step in steps:
        opt.push(_grads(step))
        seen[opt.version] = opt.pull()
    return seen


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def test_healthy_and_health_inside_and_from_the_host(dock: Docker) -> None:
    c = dock.container()
    took = c.wait_healthy()
    inside = c.exec("adamax-ps", "health")
    assert inside.returncode == 0 and inside.stdout.strip() == "SERVING", inside
    outside = _host_cli("health", "--target", c.target)
    assert outside.returncode == 0 and outside.stdout.strip() == "SERVING", outside
    print(f"healthy after {took:.1f} s")


def test_a_worker_trains_through_the_published_ports(dock: Docker) -> None:
    """gRPC streams and the bulk channel (TCP: shared memory does not cross the container) give Keras's weights."""
    c = dock.container()
    c.wait_healthy()
    expected = _keras_weights(range(20))
    for bulk, path in (("off", "grpc"), ("tcp", "tcp"), ("auto", "tcp")):
        with _optimizer(c.target, f"job-{bulk}", bulk=bulk) as opt:
            opt.build(INITIAL)
            _train(opt, range(20))
            assert opt.transfer_path == path
            assert opt.version == 20
            _same(opt.pull(), expected)


def test_docker_stop_writes_a_final_checkpoint_that_a_new_container_restores(dock: Docker) -> None:
    volume = dock.volume()
    first = dock.container(volume)  # the image checkpoints every 60 s: only the final one is written here
    first.wait_healthy()
    with _optimizer(first.target, "job") as opt:
        opt.build(INITIAL)
        weights = _train(opt, range(7))[7]
    started = time.monotonic()
    subprocess.run(["docker", "stop", "-t", "10", first.name], check=True, capture_output=True, timeout=30)
    took = time.monotonic() - started
    state = first.wait_exited(5)
    assert state["ExitCode"] == 0, first.logs()
    assert took < 10, f"docker stop took {took:.1f} s (Docker kills at 10 s)"
    checkpoints = dock.checkpoints(volume)
    assert checkpoints, first.logs()
    last = checkpoints[-1]
    assert last["reason"] == "shutdown" and [(o["key"], o["version"]) for o in last["optimizers"]] == [("job", 7)], last
    print(f"docker stop: {took:.2f} s, exit 0, final checkpoint {last['checkpoint_id']}")

    second = dock.container(volume)
    second.wait_healthy()
    with _optimizer(second.target, "job") as opt:
        _same(opt.pull(), weights)
        assert opt.version == 7
        _train(opt, range(7, 10))  # and training goes on from there, as Keras would
        _same(opt.pull(), _keras_weights(range(10)))


def test_docker_kill_then_restart_restores_the_last_checkpoint(dock: Docker) -> None:
    c = dock.container(env={"ADAMAX_PS_CHECKPOINT_EVERY_STEPS": "5", "ADAMAX_PS_CHECKPOINT_EVERY_SECONDS": "0"})
    c.wait_healthy()
    from adamax_client.checkpoints import CheckpointClient

    with _optimizer(c.target, "job") as opt:
        opt.build(INITIAL)
        seen = _train(opt, range(12))
        with CheckpointClient(c.target, timeout=30) as ckpt:
            deadline = time.monotonic() + 60
            step, saved = 12, []
            # A checkpoint is written in the background once 5 versions passed since the last
            # one; the policy loop polls, so one may hold a later version than due (the first at
            # 9, say, and the next then at 14). Train on, one step at a time and bounded, until
            # one at version 10 or later is on disk.
            while True:
                saved = [o["version"] for info in ckpt.list() for o in info.optimizers if o["optimizer"] == "job"]
                if max(saved, default=0) >= 10:
                    break
                assert time.monotonic() < deadline and step < 40, (saved, c.logs())
                time.sleep(0.2)
                if max(saved, default=0) + 5 > step:  # the next checkpoint needs more steps
                    seen.update(_train(opt, range(step, step + 1)))
                    step += 1
        last = max(saved)
        # Fewer than 5 more steps: no checkpoint holds these two, so the kill loses them.
        seen.update(_train(opt, range(step, step + 2)))
    assert last in seen and last < step + 2, saved
    subprocess.run(["docker", "kill", c.name], check=True, capture_output=True, timeout=30)
    assert c.wait_exited(10)["ExitCode"] != 0
    subprocess.run(["docker", "start", c.name], check=True, capture_output=True, timeout=60)
    c.refresh_ports()  # a restart may publish gRPC on another host port
    c.wait_healthy()
    with _optimizer(c.target, "job") as opt:
        _same(opt.pull(), seen[last])
        assert opt.version == last, c.logs()


def test_logs_are_json_lines(dock: Docker) -> None:
    """The image logs JSON (ADAMAX_PS_LOG_FORMAT=json): every line, start-up to shutdown, is one object."""
    c = dock.container()
    c.wait_healthy()
    with _optimizer(c.target, "job") as opt:
        opt.build(INITIAL)
        _train(opt, range(3))
        opt.push({"w": INITIAL["w"]})  # a gradient missing for `b`: logged by the server
    subprocess.run(["docker", "stop", "-t", "10", c.name], check=True, capture_output=True, timeout=30)
    lines = [line for line in c.logs().splitlines() if line.strip()]
    assert any("listening" in line for line in lines)
    bad = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(entry, dict) or not {"ts", "level", "message"} <= entry.keys():
            bad.append(line)
    assert not bad, "plain-text lines in a JSON log:\n" + "\n".join(bad)


def test_a_forced_gpu_device_without_a_gpu_fails_at_start_up(dock: Docker) -> None:
    """What the CUDA image does on a host without a GPU: exit at once with a message, never 'healthy'."""
    c = dock.container(env={"ADAMAX_PS_DEVICE": "gpu", "ADAMAX_PS_LOG_FORMAT": "text"})
    state = c.wait_exited(60)
    assert state["ExitCode"] == 2, c.logs()
    assert (state.get("Health") or {}).get("Status") != "healthy"
    assert "no CUDA GPU" in c.logs(), c.logs()


def test_healthcheck_with_tls_from_the_environment_and_serve_port_flag(dock: Docker, tmp_path) -> None:
    """TLS turned on through ADAMAX_PS_TLS_* (mutual TLS included) and `serve --port N`: still healthy."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from _certs import make_pki  # type: ignore[import-not-found]

    pki = make_pki(tmp_path)
    tmp_path.chmod(0o755)  # readable by the image's user (uid 10001)
    for path in tmp_path.iterdir():
        path.chmod(0o644)
    c = dock.container(
        env={"ADAMAX_PS_TLS_CERT": "/tls/server.pem", "ADAMAX_PS_TLS_KEY": "/tls/server.key",
             "ADAMAX_PS_TLS_CA": "/tls/ca.pem", "ADAMAX_PS_TLS_REQUIRE_CLIENT_CERT": "1"},
        args=("serve", "--port", "50061"),
        run_options=("-v", f"{tmp_path}:/tls:ro", "-p", "127.0.0.1::50061"),
    )
    c.wait_healthy()
    inside = c.exec("adamax-ps", "health")
    assert inside.returncode == 0 and inside.stdout.strip() == "SERVING", inside
    outside = _host_cli("health", "--target", f"127.0.0.1:{c.ports[50061]}", "--tls-ca", str(pki.ca),
                        "--tls-client-cert", str(pki.client_cert), "--tls-client-key", str(pki.client_key),
                        "--tls-server-name", "localhost")
    assert outside.returncode == 0 and outside.stdout.strip() == "SERVING", outside


def test_compose_server_and_three_workers_finish(dock: Docker, tmp_path) -> None:
    """docker/compose.yaml as shipped (the session's image instead of two builds): 3 workers finish."""
    steps = 40
    override = tmp_path / "override.yaml"
    override.write_text(
        "services:\n"
        f"  ps:\n    image: {dock.image}\n"
        f"  worker:\n    image: {dock.image}\n    environment:\n      DEMO_STEPS: \"{steps}\"\n"
    )
    project = unique("adamaxtest").replace("-", "")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ADAMAX_PS_", "PS_", "COMPOSE_"))},
           "PS_GRPC_PUBLISH": "127.0.0.1:", "PS_BULK_PUBLISH": "127.0.0.1:", "PS_METRICS_PUBLISH": "127.0.0.1:"}
    files = [str(REPO_ROOT / "docker" / "compose.yaml"), str(override)]
    started = time.monotonic()
    dock.compose(project, files, env, "up", "-d", "--no-build", timeout=180)
    workers = dock.compose(project, files, env, "ps", "-q", "worker").stdout.split()
    assert len(workers) == 3, workers
    deadline = time.monotonic() + 240
    codes: dict[str, int] = {}
    while len(codes) < 3 and time.monotonic() < deadline:
        for cid in workers:
            state = json.loads(docker("inspect", "-f", "{{json .State}}", cid).stdout)
            if state["Status"] == "exited":
                codes[cid] = state["ExitCode"]
        time.sleep(1)
    logs = dock.compose(project, files, env, "logs", "--no-color", check=False).stdout
    assert len(codes) == 3 and set(codes.values()) == {0}, (codes, logs)
    for cid in workers:
        out = docker("logs", cid).stdout
        first = float(out.split("step 0: loss ")[1].split()[0])
        final = float(out.split(f"step {steps - 1}: loss ")[1].split()[0])
        assert final < first, out
    server = dock.compose(project, files, env, "ps", "-q", "ps").stdout.split()[0]
    state = json.loads(docker("inspect", "-f", "{{json .State}}", server).stdout)
    assert state["Health"]["Status"] == "healthy", logs
    took = time.monotonic() - started
    dock.compose(project, files, env, "stop", "-t", "10", "ps", timeout=60)
    assert json.loads(docker("inspect", "-f", "{{json .State}}", server).stdout)["ExitCode"] == 0, logs
    final = dock.checkpoints(f"{project}_checkpoints")[-1]  # async: every push of every worker applied once
    assert [(o["key"], o["version"]) for o in final["optimizers"]] == [("demo", 3 * steps)], final
    print(f"compose: server + 3 workers x {steps} steps in {took:.1f} s")
