"""The calls the framework adapters make, for a sharded job (mixed into ``ShardedRemoteAdamax``).

``adamax_client.torch.RemoteAdamax`` and ``adamax_client.keras.RemoteAdamax`` drive a job through
``push_stream`` (gradients that arrive while backward runs), ``pull_into`` (weights written into
the caller's arrays), ``last_iterations``, ``delete`` and ``if_exists``. On one server those calls
stream over one connection; on a sharded job each one is the same sharded call the rest of the
API makes (a push is staged on every shard, then committed at the leader; a pull reads every
shard's pieces of one version), so an adapter given a shard list behaves exactly as the plain
sharded client: the same weights, the same errors.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from adamax_client.errors import AlreadyExistsError, InvalidArgumentError, UnimplementedError
from adamax_client._settings import IF_EXISTS

_log = logging.getLogger("adamax_client")


class ShardedAdapterCalls:
    """``push_stream``, ``pull_into``, ``delete`` and ``if_exists`` over every shard."""

    # Set by ShardedRemoteAdamax.
    key: str
    num_shards: int
    last_iterations: int

    @classmethod
    def adopt(cls, client: Any, shard_args: tuple[Any, tuple[Any, ...], dict[str, Any]] | None) -> bool:
        """Turn a plain ``RemoteAdamax`` whose one target answers no ``AdamaxService`` into this
        sharded client, when that target is the only shard of a sharded job (``serve
        --shard-index 0 --shards ADDR``): one shard runs the same code as N. ``shard_args``: the
        constructor's (target, args, kwargs). False (nothing changed) when it is not a shard."""
        if shard_args is None:
            return False
        target, args, kwargs = shard_args
        plain = client.__class__
        client.__class__ = cls
        try:
            cls.__init__(client, target, *args, sharded=True, **kwargs)
        except UnimplementedError:
            client.__class__ = plain
            return False
        _log.info("'%s' is the only shard of a sharded job; this client drives it as one", target)
        return True

    def _create_job(self, config: dict[str, Any], policy: dict[str, Any], if_exists: str) -> bool:
        """Create the job on every shard; True when it did not exist before.

        ``"resume"`` attaches to an existing job (its config and policy must match),
        ``"error"`` refuses one, ``"replace"`` deletes it on every shard first.
        """
        if if_exists not in IF_EXISTS:
            raise ValueError(f"`if_exists` must be one of {list(IF_EXISTS)}. Received: if_exists={if_exists!r}")
        if if_exists == "replace":
            self._all("delete", lambda i: ())  # type: ignore[attr-defined]
        created = self._all("create", lambda i: (config, policy))  # type: ignore[attr-defined]
        if if_exists == "error" and not all(created):
            raise AlreadyExistsError(
                f"optimizer '{self.key}' already exists on the shards; pass if_exists='resume' to join it "
                "or if_exists='replace' to start it over"
            )
        return all(created)

    def push_stream(
        self, items: Iterable[tuple[str, Any]], *, num_tensors: int, nbytes: int | None = None,
        step: int | None = None, request_id: str | None = None, timeout: float | None = None,
    ) -> Any:
        """One push from ``(name, gradient)`` items (``None``: no gradient); see ``RemoteAdamax``.

        A sharded push needs every gradient before it can cut them into each shard's slices, so
        the items are collected first; then it is ``push``: staged on every shard in parallel and
        committed at the leader. ``nbytes`` (a shared-memory hint of one server) is not used.
        """
        del nbytes
        gradients: OrderedDict[str, Any] = OrderedDict()
        for name, value in items:
            if name in gradients:
                raise InvalidArgumentError(f"The push carries two gradients for variable '{name}'.")
            gradients[name] = value
        if len(gradients) != int(num_tensors):
            raise InvalidArgumentError(
                f"the push announced {num_tensors} tensors but carried {len(gradients)}"
            )
        return self.push(gradients, step=step, request_id=request_id, timeout=timeout)  # type: ignore[attr-defined]

    def pull_into(self, out: Mapping[str, np.ndarray], *, min_version: int | None = None,
                  timeout: float | None = None) -> int:
        """Pull all weights into ``out`` (name -> writable array of the variable's shape); returns
        the version. Arrays of another dtype are cast; waits like ``pull()``."""
        values = self.pull(min_version=min_version, timeout=timeout)  # type: ignore[attr-defined]
        missing = set(out) - set(values)
        if missing:
            raise InvalidArgumentError(f"optimizer '{self.key}' has no variable(s) {sorted(missing)}")
        for name, dest in out.items():
            value = values[name]
            if tuple(dest.shape) != tuple(value.shape):
                raise InvalidArgumentError(
                    f"`out['{name}']` has shape {tuple(dest.shape)}; the variable has {tuple(value.shape)}"
                )
            np.copyto(dest, value, casting="same_kind")
        self._cache.pop((), None)  # type: ignore[attr-defined]  # the caller's arrays hold this version now
        return int(self._version)  # type: ignore[attr-defined]

    def delete(self) -> bool:
        """Delete this job on every shard (weights, state, workers); False if it was gone on all.

        Other workers' calls then fail with NotFound.
        """
        deleted = self._all("delete", lambda i: ())  # type: ignore[attr-defined]
        self._placement = None
        self._specs = []
        self._cache.clear()  # type: ignore[attr-defined]
        self._describe_cache = None
        return any(bool(d) for d in deleted)
