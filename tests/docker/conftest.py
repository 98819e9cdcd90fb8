"""Docker fixtures: a running engine (else skip), the image built once per session, and
containers, volumes and compose projects that are always removed.

Names carry a random suffix (``adamax-test-<hex>``) so parallel sessions never collide, ports
are published on 127.0.0.1 only, and every wait has a time bound. Without an engine every test
here is skipped with the reason; ``bash ../shared/docker/engine.sh up`` starts one on the CI
machine (``.ci/run`` does that).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 900  # a cold build downloads the wheels (numpy, numba, grpc) once
CMD_TIMEOUT_S = 120

pytestmark = pytest.mark.docker


def docker(*args: str, timeout: float = CMD_TIMEOUT_S, check: bool = True, input: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    """``docker ARGS`` with a time bound; raises with its output when ``check`` and it fails."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def engine_problem() -> str | None:
    """Why Docker tests cannot run here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (start an engine: bash ../shared/docker/engine.sh up)"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine is running ({detail}); start one: bash ../shared/docker/engine.sh up"
    return None


def unique(prefix: str = "adamax-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for publishing a port under the same number inside)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def docker_engine() -> None:
    problem = engine_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def image(docker_engine: None) -> Iterator[str]:
    """docker/Dockerfile built once per session under a unique tag (the layer cache stays)."""
    tag = f"{unique()}:latest"
    started = time.monotonic()
    docker("build", "-q", "-f", "docker/Dockerfile", "-t", tag, str(REPO_ROOT), timeout=BUILD_TIMEOUT_S)
    print(f"\nbuilt {tag} in {time.monotonic() - started:.1f} s")
    try:
        yield tag
    finally:
        docker("rmi", "--no-prune", tag, check=False)


@dataclass
class Container:
    """One ``docker run -d`` of the image; ``ports`` maps container port -> host port on 127.0.0.1."""

    name: str
    image: str
    volume: str
    env: dict[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()
    bulk_port: int = 0
    run_options: Sequence[str] = ()
    ports: dict[int, int] = field(default_factory=dict)

    def run(self) -> Container:
        env = {"ADAMAX_PS_BULK_PORT": str(self.bulk_port), **self.env}
        options = ["--name", self.name, "-v", f"{self.volume}:/checkpoints",
                   "-p", "127.0.0.1::50051", "-p", f"127.0.0.1:{self.bulk_port}:{self.bulk_port}",
                   "--health-interval", "2s", "--health-start-period", "30s"]
        for key, value in env.items():
            options += ["-e", f"{key}={value}"]
        docker("run", "-d", *options, *self.run_options, self.image, *self.args)
        self.refresh_ports()
        return self

    def refresh_ports(self) -> None:
        self.ports = {}
        bindings = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", self.name).stdout) or {}
        for spec, hosts in bindings.items():
            if hosts:
                self.ports[int(spec.split("/")[0])] = int(hosts[0]["HostPort"])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports[50051]}"

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        proc = docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_healthy(self, timeout: float = 90.0) -> float:
        """Seconds until Docker reports the HEALTHCHECK healthy; fails with the logs otherwise."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = self.state()
            if not state["Running"]:
                raise AssertionError(f"{self.name} exited {state['ExitCode']} before healthy:\n{self.logs()}")
            if (state.get("Health") or {}).get("Status") == "healthy":
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not healthy within {timeout} s: {self.state().get('Health')}\n{self.logs()}")

    def wait_exited(self, timeout: float = 60.0) -> dict:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            state = self.state()
            if not state["Running"] and state["Status"] in ("exited", "dead"):
                return state
            time.sleep(0.3)
        raise AssertionError(f"{self.name} still running after {timeout} s:\n{self.logs()}")

    def exec(self, *cmd: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *cmd, check=False, timeout=timeout)


class Docker:
    """Makes containers, volumes and compose projects for one test and removes them all afterwards."""

    def __init__(self, image: str) -> None:
        self.image = image
        self._containers: list[str] = []
        self._volumes: list[str] = []
        self._projects: list[tuple[str, list[str], dict[str, str]]] = []

    def volume(self) -> str:
        name = unique()
        docker("volume", "create", name)
        self._volumes.append(name)
        return name

    def container(self, volume: str | None = None, *, start: bool = True, **kwargs) -> Container:
        c = Container(unique(), self.image, volume or self.volume(), bulk_port=free_port(), **kwargs)
        self._containers.append(c.name)
        return c.run() if start else c

    def track_container(self, name: str) -> None:
        self._containers.append(name)

    def checkpoints(self, volume: str) -> list[dict]:
        """The checkpoints a volume holds, read by the image's own checkpoint code (newest last)."""
        script = ("import dataclasses, json; from adamax_server.storage.checkpoint import CheckpointStore; "
                  "print(json.dumps([dataclasses.asdict(i) for i in CheckpointStore('/checkpoints').list()]))")
        out = docker("run", "--rm", "-v", f"{volume}:/checkpoints", "--entrypoint", "python", self.image, "-c", script)
        return json.loads(out.stdout)

    def compose(self, project: str, files: list[str], env: dict[str, str], *args: str, timeout: float = CMD_TIMEOUT_S,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        if not any(p[0] == project for p in self._projects):
            self._projects.append((project, files, env))
        cmd = ["docker-compose", "-p", project]
        for f in files:
            cmd += ["-f", f]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=REPO_ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd + list(args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def cleanup(self) -> None:
        for project, files, env in self._projects:
            with contextlib.suppress(Exception):
                self.compose(project, files, env, "down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=120)
        for name in self._containers:
            with contextlib.suppress(Exception):
                docker("rm", "-f", "-v", name, check=False)
        for name in self._volumes:
            with contextlib.suppress(Exception):
                docker("volume", "rm", "-f", name, check=False)


@pytest.fixture
def dock(image: str) -> Iterator[Docker]:
    d = Docker(image)
    try:
        yield d
    finally:
        d.cleanup()
