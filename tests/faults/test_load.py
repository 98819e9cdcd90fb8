"""Load and connection faults: 16 worker processes x 500 pushes, injected retries and drops.

The protocol promises that every push is applied exactly once (async mode), so the final
iteration count is exactly workers x pushes, every push got its own version, and the weights
equal an in-process replay of the pushes in version order. The test prints pushes/s and the
push latency percentiles (client-measured, retries included).

``ADAMAX_PS_LOAD_PUSHES`` changes the pushes per worker (default 500).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import grpc
import numpy as np
import pytest

from _ps_helpers import assert_bitwise_equal, host_weights, running_server
import _ps_load_workers as workers

from adamax_client import RemoteAdamax
from adamax_server import Adamax

WORKERS = 16
PUSHES = int(os.environ.get("ADAMAX_PS_LOAD_PUSHES", "500"))
FAULT_RATE = 0.02


@pytest.mark.parametrize("bulk", ["off", "auto"], ids=["grpc", "bulk-shm"])
def test_16_workers_x_500_pushes_with_injected_faults_apply_each_push_exactly_once(bulk):
    init = {"w": np.zeros(workers.SHAPE, np.float32)}
    with running_server(max_workers=WORKERS + 8) as (target, coordinator):
        with RemoteAdamax(target, name="load", learning_rate=0.01) as setup:
            setup.build(init)
        # spawn, never fork: this process runs gRPC threads
        with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
            results = pool.starmap(
                workers.push_worker, [(target, "load", w, PUSHES, FAULT_RATE, bulk) for w in range(WORKERS)]
            )
        host = coordinator.get("load")
        total = WORKERS * PUSHES
        status = host.status()
        order = {}
        for w, result in enumerate(results):
            for version, k, _, _, dup in result["log"]:
                assert version not in order, f"version {version} answered twice: {order[version]} and {(w, k, dup)}"
                order[version] = (w, k)
        assert (status.iterations, status.version) == (total, total)
        assert sorted(order) == list(range(1, total + 1))

        replay = Adamax.from_config(host.get_config(), device="cpu")
        replay.build(init)
        for version in range(1, total + 1):
            replay.apply({"w": workers.gradient(*order[version])})
        assert_bitwise_equal(host_weights(host)["w"], replay.trainable_variables["w"])

    entries = [e for r in results for e in r["log"]]
    latencies = np.array([e[3] for e in entries])
    span = max(e[2] + e[3] for e in entries) - min(e[2] for e in entries)
    faults = {k: sum(r["faults"][k] for r in results) for k in results[0]["faults"]}
    duplicates = sum(e[4] for e in entries)
    assert faults["lost_reply"] == 0 or duplicates >= 1  # lost replies were answered from the table
    assert sum(faults.values()) > 0 and {r["path"] for r in results} == {"grpc" if bulk == "off" else "shm"}
    print(
        f"\nload ({results[0]['path']}): {WORKERS} workers x {PUSHES} pushes = {total} in {span:.2f} s -> {total / span:.0f} pushes/s; "
        f"latency p50 {np.percentile(latencies, 50) * 1e3:.2f} ms, p99 {np.percentile(latencies, 99) * 1e3:.2f} ms; "
        f"injected faults {faults}, retries answered as duplicates {duplicates}"
    )


def test_idle_connections_with_keepalive_are_not_dropped():
    ping_fast = [("grpc.keepalive_time_ms", 300), ("grpc.keepalive_timeout_ms", 2000),
                 ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    # The server accepts pings this often (production: every 10 s, clients ping every 30 s).
    with running_server(options=[("grpc.http2.min_ping_interval_without_data_ms", 100)]) as (target, _):
        with RemoteAdamax(target, name="idle", channel_options=ping_fast, timeout=5) as remote:
            remote.build({"w": np.zeros(2, np.float32)})
            states = []
            channel = remote._transport._raw_channel
            channel.subscribe(states.append)
            time.sleep(2.5)  # idle: only keepalive pings on the connection
            remote.apply([np.ones(2, np.float32)])
            channel.unsubscribe(states.append)
            assert set(states) == {grpc.ChannelConnectivity.READY}, states


def test_without_permission_the_server_drops_a_pinging_client():
    """The control for the test above: a server that refuses frequent pings sends GOAWAY."""
    ping_fast = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_permit_without_calls", 1),
                 ("grpc.http2.max_pings_without_data", 0)]
    strict = [("grpc.http2.min_ping_interval_without_data_ms", 60_000), ("grpc.http2.max_ping_strikes", 1)]
    with running_server(options=strict) as (target, _):
        with RemoteAdamax(target, name="idle", channel_options=ping_fast, timeout=5) as remote:
            remote.build({"w": np.zeros(2, np.float32)})
            dropped = threading.Event()
            channel = remote._transport._raw_channel

            def watch(state):
                if state != grpc.ChannelConnectivity.READY:
                    dropped.set()

            channel.subscribe(watch)
            assert dropped.wait(5)
            channel.unsubscribe(watch)
