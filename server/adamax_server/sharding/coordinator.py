"""The optimizers of one server: each is a one-shard job (``sharding.single.OptimizerHost``).

The coordinator owns every optimizer hosted by a server (keyed by name). Each runs the code
every shard of a sharded job runs (a ``ShardHost`` and its ``Leader``, in process), which
decides how pushes from workers become steps:

* ``async``: each push is one apply, serialized by the optimizer's lock; ``max_staleness``
  rejects gradients computed more than that many versions ago.
* ``sync``: pushes computed on the current version are collected; when K distinct workers
  have pushed, their mean (or sum) is one apply. Late pushes for a closed round are dropped
  and reported, never applied. A round timeout closes the round with what arrived, or
  aborts it, so a dead worker cannot hang the job.

Every push carries (worker id, request id); a retry is answered with the first outcome and
never applied twice, also while the first copy is still streaming or being applied.

Versions: ``version`` counts changes of the model variables (applies, closed rounds,
assignments, loads). Workers compute gradients on a version and pull by version.

Nothing here imports grpc or the generated protocol code: the servicer translates wire
frames to the calls below, and ``errors.status_for`` maps the exceptions to status codes.
The engine is not thread safe; every engine call happens under the optimizer's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from adamax_server.coordination.policy import (
    CoordinatorObserver,
    OptimizerStatus,
    Policy,
    PullResult,
    PushResult,
    TensorMeta,
    WorkerStatus,
    config_to_json,
    normalize_config,
)
from adamax_server.coordination.snapshot import OptimizerSnapshot
from adamax_server.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from adamax_server.sharding.shard_engine import ShardEngine
from adamax_server.sharding.single import OptimizerHost

# A server's public face (the types live in ``coordination.policy``, the host in ``single``).
__all__ = [
    "Coordinator",
    "CoordinatorObserver",
    "OptimizerHost",
    "OptimizerStatus",
    "Policy",
    "PullResult",
    "PushResult",
    "TensorMeta",
    "WorkerStatus",
    "config_to_json",
]

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the registry


EngineFactory = Callable[[Mapping[str, Any]], ShardEngine]


class Coordinator:
    """All optimizers of one server, keyed by name."""

    def __init__(
        self,
        *,
        device: str = "auto",
        engine_factory: EngineFactory | None = None,
        dedup_capacity: int = 1024,
        max_optimizers: int = 1024,
        observer: CoordinatorObserver | None = None,
    ) -> None:
        self._observer = observer
        self._engine_factory: EngineFactory = engine_factory or (lambda cfg: ShardEngine.from_config(cfg, device=device))
        self._dedup_capacity = dedup_capacity
        self._max_optimizers = max_optimizers
        self._lock = threading.Lock()
        self._hosts: dict[str, OptimizerHost] = {}
        self._closed = False
        self.device = device

    def create(
        self, key: str, config: Mapping[str, Any], policy: Policy, if_exists: str = "resume"
    ) -> tuple[bool, OptimizerHost]:
        """Create an optimizer from a Keras config.

        ``if_exists``: ``"resume"`` keeps an existing optimizer of that name when its config and
        policy are the same (idempotent; how workers join a job), ``"error"`` refuses, and
        ``"replace"`` deletes it and creates a new one in its place.
        """
        if not key:
            raise InvalidArgument("`optimizer` (the key of the optimizer on the server) must be a non-empty string.")
        if if_exists not in ("resume", "error", "replace"):
            raise InvalidArgument(f"`if_exists` must be 'resume', 'error' or 'replace'. Received: {if_exists!r}")
        config = dict(config)
        if config.get("name") is None:
            config["name"] = key
        engine = self._engine_factory(config)  # Keras-style ValueError on a bad config
        normalized = normalize_config(engine.get_config())
        replaced: OptimizerHost | None = None
        with self._lock:
            self._require_open()
            existing = self._hosts.get(key)
            if existing is not None and if_exists == "error":
                raise AlreadyExists(
                    f"optimizer '{key}' already exists (iteration {existing.iterations}); pass "
                    "if_exists='resume' to continue it or 'replace' to start over, or use another name"
                )
            if existing is not None and if_exists == "resume":
                if existing.initial_config != normalized or existing.policy != policy:
                    raise AlreadyExists(
                        f"optimizer '{key}' already exists with a different "
                        f"{'config' if existing.initial_config != normalized else 'coordination policy'}; "
                        "use another name, the same settings, or if_exists='replace'"
                    )
                return False, existing
            if existing is not None:  # replace: the old one goes, atomically for every caller
                replaced = self._hosts.pop(key)
            elif len(self._hosts) >= self._max_optimizers:
                raise ResourceExhausted(f"this server hosts at most {self._max_optimizers} optimizers")
            host = OptimizerHost(
                key, self._engine_factory, normalized, policy, dedup_capacity=self._dedup_capacity, observer=self._observer
            )
            self._hosts[key] = host
        if replaced is not None:
            replaced.close()
        return True, host

    def restore(self, snap: OptimizerSnapshot) -> tuple[OptimizerHost, int, int]:
        """Restore one optimizer: replace a running one (fenced) or create it with the saved version."""
        with self._lock:
            self._require_open()
            host = self._hosts.get(snap.key)
            if host is None:
                if len(self._hosts) >= self._max_optimizers:
                    raise ResourceExhausted(f"this server hosts at most {self._max_optimizers} optimizers")
                host = OptimizerHost(
                    snap.key, self._engine_factory, snap.initial_config, Policy(**snap.policy),
                    dedup_capacity=self._dedup_capacity, observer=self._observer,
                )
                version, iterations = host.restore(snap, fence=False)
                self._hosts[snap.key] = host
                return host, version, iterations
        version, iterations = host.restore(snap, fence=True)
        return host, version, iterations

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("the parameter server is shutting down")

    def get(self, key: str) -> OptimizerHost:
        with self._lock:
            self._require_open()
            host = self._hosts.get(key)
            if host is None:
                raise NotFound(f"no optimizer named '{key}' on this server. Existing: {sorted(self._hosts)}")
            return host

    def hosts(self) -> list[OptimizerHost]:
        with self._lock:
            return [self._hosts[k] for k in sorted(self._hosts)]

    def delete(self, key: str) -> bool:
        with self._lock:
            host = self._hosts.pop(key, None)
        if host is None:
            return False
        host.close()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()
