"""Demo worker for docker/compose*.yaml: fits y = X @ w_true + b_true through the parameter server.

Only the client package and NumPy are used, as on a real worker. Settings come from the
environment: ADAMAX_PS_TARGET (host:port, or a sharded job's shard list host0:port,host1:port),
ADAMAX_PS_TOKEN, ADAMAX_PS_TLS_CA, DEMO_STEPS. Workers of one job share the optimizer "demo"
(async); each pushes gradients of its own synthetic batches and prints its loss now and then.
UNAVAILABLE (a restarting server or shard) is retried with backoff by the client. A push that
finds the job restored from a checkpoint (a shard came back after a crash) was not applied
(ABORTED; a pull waiting for a version the restore took back fails the same way): the worker
pulls the restored weights and goes on.
"""

from __future__ import annotations

import os
import socket

import numpy as np

from adamax_client import RemoteAdamax, RetryPolicy, tls_channel_credentials
from adamax_client.errors import AbortedError


def main() -> int:
    target = os.environ.get("ADAMAX_PS_TARGET", "127.0.0.1:50051")
    steps = int(os.environ.get("DEMO_STEPS", "300"))
    ca = os.environ.get("ADAMAX_PS_TLS_CA")
    rng = np.random.default_rng(abs(hash(socket.gethostname())) % 2**32)
    w_true = np.linspace(-1, 1, 8, dtype=np.float32)
    with RemoteAdamax(
        target, name="demo", learning_rate=0.05, timeout=60,
        retry=RetryPolicy(max_backoff=5.0, max_attempts=30, wait_for_server=True),
        token=os.environ.get("ADAMAX_PS_TOKEN") or None,
        credentials=tls_channel_credentials(ca) if ca else None,
    ) as opt:
        opt.build({"w": np.zeros(8, np.float32), "b": np.zeros(1, np.float32)})  # or attach to the existing
        step = 0
        for _ in range(10 * steps):  # bounded: a pull the restore aborted repeats its step
            if step == steps:
                break
            x = rng.standard_normal((64, 8)).astype(np.float32)
            y = x @ w_true + np.float32(0.5)
            try:
                weights = opt.pull()
            except AbortedError as exc:  # it waited for this worker's last push, which a restore took back
                print(f"{opt.worker_id} step {step}: pull aborted ({exc}); pulling again", flush=True)
                continue
            err = x @ weights["w"] + weights["b"][0] - y
            try:
                opt.push({"w": (x.T @ err) * np.float32(2 / len(x)), "b": np.array([2 * err.mean()], np.float32)})
            except AbortedError as exc:  # not applied: the job was restored (or the push came too late)
                print(f"{opt.worker_id} step {step}: push not applied ({exc}); pulling again", flush=True)
            if step % 50 == 0 or step == steps - 1:
                print(f"{opt.worker_id} step {step}: loss {float((err ** 2).mean()):.5f} version {opt.version}", flush=True)
            step += 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
