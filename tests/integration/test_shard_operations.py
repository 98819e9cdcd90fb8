"""Operating a sharded job: the shard index from a StatefulSet hostname, status with each shard's
health, and every metric of a shard labelled with its index.

* ``serve --shard-index-from-hostname``: the ordinal the hostname ends with (a StatefulSet's pod
  ``adamax-ps-2`` is shard 2); a contradicting ``--shard-index`` or a hostname without ordinal is
  refused; the StatefulSet's own arguments and environment parse into exactly that.
* ``adamax-ps status --target A0,A1``: every shard's health next to its version and bytes; a
  shard that is down is shown UNREACHABLE (the others still are) and the exit status is 1.
* ``serve --shard-index I --metrics-port 0``: every series on ``/metrics`` carries ``shard="I"``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from _ps_helpers import REPO_ROOT
from _sharding_helpers import free_ports
from adamax_client import RemoteAdamax
from adamax_server.cli import commands as cli
from adamax_server.cli import shard_cli
from adamax_server.sharding.server import create_shard_server, stop_shard_server


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"shard_index": None, "shard_index_from_hostname": False, **kw})


def test_shard_index_from_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [f"adamax-ps-{i}.adamax-ps.ml.svc.cluster.local:50051" for i in range(3)]
    monkeypatch.setattr(socket, "gethostname", lambda: "adamax-ps-2")
    assert shard_cli._shard_index(_args(shard_index_from_hostname=True), shards) == 2
    assert shard_cli._shard_index(_args(shard_index_from_hostname=True, shard_index="2"), shards) == 2
    with pytest.raises(ValueError, match="contradicts"):
        shard_cli._shard_index(_args(shard_index_from_hostname=True, shard_index="1"), shards)
    assert shard_cli._shard_index(_args(shard_index="1"), shards) == 1  # the explicit index, hostname unused
    with pytest.raises(ValueError, match="--shard-index-from-hostname"):
        shard_cli._shard_index(_args(), shards)
    monkeypatch.setattr(socket, "gethostname", lambda: "trainer")
    with pytest.raises(ValueError, match="ends with -<ordinal>"):
        shard_cli._shard_index(_args(shard_index_from_hostname=True), shards)


def test_the_statefulset_arguments_parse_into_a_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's args and (kubelet-expanded) environment, through the real parser."""
    import yaml

    from adamax_server.cli.runtime import unknown_env

    sys.path.insert(0, str(REPO_ROOT / "tests" / "deploy"))
    from test_kubernetes_manifests import _secrets, expand_env

    docs = list(yaml.safe_load_all((REPO_ROOT / "deploy" / "kubernetes" / "statefulset.yaml").read_text()))
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    env = expand_env(container["env"], {"metadata.namespace": "ml"}, _secrets())
    for name in [n for n in os.environ if n.startswith("ADAMAX_PS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == "serve" and args.shard_index_from_hostname is True and args.shard_index is None
    assert args.shards.split(",") == [f"adamax-ps-{i}.adamax-ps.ml.svc.cluster.local:50051" for i in range(2)]
    assert args.host == "0.0.0.0" and int(args.port) == 50051 and args.checkpoint_dir == "/checkpoints"
    assert unknown_env(env) == []  # every ADAMAX_PS_* variable the pod sets is a setting
    monkeypatch.setattr(socket, "gethostname", lambda: "adamax-ps-1")
    assert shard_cli._shard_index(args, args.shards.split(",")) == 1


def test_status_shows_each_shards_health_and_survives_a_dead_shard(capsys: pytest.CaptureFixture[str]) -> None:
    servers, ports = [], []
    for i in range(2):
        server, port = create_shard_server("127.0.0.1:0", i, ["127.0.0.1:1"] * 2, device="numba", call_timeout=2.0)
        servers.append(server)
        ports.append(port)
    targets = [f"127.0.0.1:{p}" for p in ports]
    for s in servers:
        s.shard_registry.set_shards(targets)
        s.start()
    stopped = [False, False]
    values = {"a": np.ones((300, 8), np.float32), "b": np.ones(5, np.float32)}
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, timeout=10) as opt:
            opt.build(values)
            opt.push({"a": np.ones((300, 8), np.float32), "b": np.ones(5, np.float32)})
        capsys.readouterr()
        assert cli.main(["status", "--target", ",".join(targets), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["version"] == 1 and [s["health"] for s in row["shards"]] == ["SERVING", "SERVING"]
        assert [s["version"] for s in row["shards"]] == [1, 1]
        assert sum(s["bytes"] for s in row["shards"]) == sum(v.nbytes for v in values.values())

        stop_shard_server(servers[1], grace=0)
        stopped[1] = True
        assert cli.main(["status", "--target", ",".join(targets), "--timeout", "3"]) == 1
        out = capsys.readouterr().out
        assert f"shard 0 {targets[0]}: SERVING version=1" in out
        assert f"shard 1 {targets[1]}: UNREACHABLE version=None" in out
    finally:
        for s, done in zip(servers, stopped):
            if not done:
                stop_shard_server(s, grace=0)


def test_every_metric_of_a_shard_carries_its_index() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO_ROOT / d) for d in ("server", "client", "wire"))
    for name in [n for n in env if n.startswith("ADAMAX_PS_")]:
        del env[name]
    shards = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "adamax_server.cli", "serve", "--host", "127.0.0.1",
                          "--port", shards[i].split(":")[1], "--device", "cpu", "--shard-index", str(i),
                          "--shards", ",".join(shards), "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                          "--grace", "0"], stdout=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    try:
        metrics_ports = []
        for proc in procs:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line or line.startswith("metrics on"):
                    break
            assert line.startswith("metrics on"), line
            metrics_ports.append(int(line.split(":")[-1]))
        with RemoteAdamax(shards, worker_id="w", optimizer="job", learning_rate=0.01, timeout=20) as opt:
            opt.build({"w": np.zeros(16, np.float32)})
            opt.push({"w": np.ones(16, np.float32)})
        for i, port in enumerate(metrics_ports):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            series = [line for line in text.splitlines() if line and not line.startswith("#")]
            assert any(line.startswith("adamax_ps_rpcs_total{") for line in series)
            assert any(line.startswith("adamax_ps_shard_version{") for line in series)
            assert all(f'shard="{i}"' in line for line in series), [s for s in series if f'shard="{i}"' not in s][:5]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
