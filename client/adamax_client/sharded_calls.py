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
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from adamax_wire.placement import split_values
from adamax_client.errors import AbortedError, AlreadyExistsError, InvalidArgumentError, UnavailableError, UnimplementedError
from adamax_client._settings import IF_EXISTS

_log = logging.getLogger("adamax_client")


class ShardedAdapterCalls:
    """``push_stream``, ``pull_into``, ``delete`` and ``if_exists`` over every shard, and the
    pull of one version from every shard that ``pull`` and ``pull_into`` share."""

    # Set by ShardedRemoteAdamax.
    key: str
    num_shards: int
    last_iterations: int
    _channels: Any
    _expect_version: int
    _one: Callable[..., Any]
    _each: Callable[..., list[Any]]
    _taken_back: Callable[[AbortedError], None]
    _need_placement: Callable[[], Any]

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

    def _pull_replies(self, key: tuple[str, ...], min_version: int | None, timeout: float | None,
                      out_for: Callable[[int], dict[str, np.ndarray]] | None = None) -> list[Any]:
        """(version, iterations, pieces) of every shard at one version; with ``out_for(shard)``
        (piece name -> writable view) a bulk channel receives the pieces straight into it."""
        target = self._expect_version if min_version is None else int(min_version)
        wait = timeout or self.timeout
        channels = self._channels
        assert channels is not None

        def pull_from(i: int) -> Any:  # over the shard's bulk channel where offered, else gRPC
            got = channels.pull(i, key, target, wait, out=None if out_for is None else out_for(i))
            return got if got is not None else self._one(i, "pull", list(key), target, wait, timeout=timeout)

        asked = target
        for attempt in range(16):
            try:
                replies = self._each(pull_from)
            except AbortedError as exc:
                self._taken_back(exc)
                raise
            versions = {int(r[0]) for r in replies}
            if len(versions) == 1:
                return replies
            if max(versions) - min(versions) > 1:
                # More than one event apart: a shard restarted and the leader brings them back to one
                # cut (the newest version may be taken back). Ask again for what was asked.
                time.sleep(min(2.0, 0.1 * (attempt + 1)))
                target = asked
                continue
            target = max(versions)  # an event is being committed: wait for the shards behind
        raise UnavailableError(f"the shards of optimizer '{self.key}' did not settle on one version")

    def pull_into(self, out: Mapping[str, np.ndarray], *, min_version: int | None = None,
                  timeout: float | None = None) -> int:
        """Pull all weights into ``out`` (name -> writable array of the variable's shape); returns
        the version. Arrays of another dtype are cast; waits like ``pull()``.

        As on one server, each shard's bulk channel receives (or copies out of shared memory) its
        pieces straight into ``out``: a piece of a split variable into its row range of the
        caller's array, so a pull makes no copy of its own. Arrays it cannot write into directly
        (another dtype, not C-contiguous) get the pulled values copied in.
        """
        placement = self._need_placement()
        by_name = placement.by_name()
        missing = set(out) - set(by_name)
        if missing:
            raise InvalidArgumentError(f"optimizer '{self.key}' has no variable(s) {sorted(missing)}")
        for name, dest in out.items():
            if tuple(dest.shape) != tuple(by_name[name].shape):
                raise InvalidArgumentError(
                    f"`out['{name}']` has shape {tuple(dest.shape)}; the variable has {tuple(by_name[name].shape)}"
                )
        pieces = split_values(placement, out)  # per shard: its rows of each caller array (views)
        direct = {n for n, d in out.items()  # the bulk channel can receive these in place
                  if d.dtype == np.dtype(by_name[n].dtype) and d.flags.c_contiguous and d.flags.writeable}  # fmt: skip
        views = [{n: view for n, view in mine.items() if n in direct} for mine in pieces]
        replies = self._pull_replies((), min_version, timeout, out_for=views.__getitem__)
        for shard, mine in enumerate(pieces):
            for name, target in mine.items():
                value = np.asarray(replies[shard][2][name])
                if not np.may_share_memory(target, value):  # gRPC, or not received in place
                    np.copyto(target, value, casting="same_kind")
        self.last_iterations = int(replies[0][1])
        self._version = int(replies[0][0])
        self._cache.pop((), None)  # type: ignore[attr-defined]  # the caller's arrays hold this version now
        return int(self._version)

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
