"""The calls the framework adapters make, for a sharded job (mixed into ``ShardedRemoteAdamax``).

``adamax_client.torch.RemoteAdamax`` and ``adamax_client.keras.RemoteAdamax`` drive a job through
``push_stream`` (gradients that arrive while backward runs), ``pull_into`` (weights written into
the caller's arrays), ``last_iterations``, ``delete`` and ``if_exists``. On a sharded job each one
is the same sharded call the rest of the API makes (a push is staged on every shard, then
committed at the leader; a pull reads every shard's pieces of one version), so an adapter given a
shard list behaves exactly as the plain sharded client: the same weights, the same errors.

``push_stream`` streams to every shard at once: each gradient is cut into its shards' slices as
it arrives, and every shard's bulk channel sends them while backward still produces the rest
(``ShardStreams``); the commit follows once every shard has its part.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from adamax_wire import tensors as _wire
from adamax_wire.placement import Placement, split_gradient, split_values
from adamax_client.errors import (
    AbortedError, AlreadyExistsError, DeadlineExceededError, InvalidArgumentError, NotFoundError, NotStagedError,
    UnavailableError, UnimplementedError,
)  # fmt: skip
from adamax_client._settings import IF_EXISTS
from adamax_client.remote import PushResult
from adamax_client.shard_bulk import push_result

_RESTAGE_ATTEMPTS = 3  # a push found unstaged at commit (a shard restarted) is staged and committed again
_ALIGN = 64  # bytes each tensor takes in a shared-memory push segment, rounded up to this

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

    def _staged_push(self, slices: Sequence[Any], step: int | None, request_id: str | None, timeout: float | None,
                     feed: Callable[[], None] | None = None) -> PushResult:  # fmt: skip
        """Stage ``slices[i]`` on every shard, then commit at the leader. A shard's slices are a
        list, or a stream that ``feed`` fills in this thread while the stages send what arrived
        (``push_stream``); a stage over gRPC collects its stream first."""
        step = self._version if step is None else int(step)
        request_id = request_id or uuid.uuid4().hex
        deadline = timeout or self.timeout
        channels = self._channels
        assert channels is not None

        def stage(i: int) -> None:  # over the shard's bulk channel where offered, else gRPC
            if channels.stage(i, request_id, step, slices[i], wire=self._gradient_wire, timeout=deadline) is None:
                self._one(i, "stage", self.worker_id, request_id, list(slices[i]), timeout=timeout, wire=self._gradient_wire)

        def stage_and_commit(_: int = 0) -> PushResult:  # the only stage, on the leader, carries the commit
            reply = channels.stage(0, request_id, step, slices[0], wire=self._gradient_wire, timeout=deadline, commit=True)
            return push_result(reply) if reply is not None else self._one(
                0, "stage_push", self.worker_id, request_id, list(slices[0]), step, timeout=timeout, wire=self._gradient_wire)

        one_stage = self.num_shards == 1 and bool((self._describe_cache or {}).get("stage_push"))
        for attempt in range(_RESTAGE_ATTEMPTS):
            alongside = feed if attempt == 0 else None  # a retry resends what the streams hold
            try:
                if one_stage:
                    result = self._each(stage_and_commit, alongside, shards=1)[0]
                else:
                    self._each(stage, alongside)
                    result = self._one(0, "push", self.worker_id, request_id, step, timeout=timeout)
                break
            except NotStagedError:  # a shard restarted (or the staged push expired): nothing was applied
                if attempt == _RESTAGE_ATTEMPTS - 1:
                    raise
            except AbortedError as exc:
                self._taken_back(exc)
                raise
        if result.outcome in ("accepted", "round_closed"):
            self._expect_version = max(self._expect_version, step + 1)
        elif result.outcome == "dropped_late":
            warnings.warn(f"worker '{self.worker_id}': {result.detail}", stacklevel=4)
        return result

    def push_stream(
        self, items: Iterable[tuple[str, Any]], *, num_tensors: int, nbytes: int | None = None,
        step: int | None = None, request_id: str | None = None, timeout: float | None = None,
    ) -> Any:
        """One push from ``(name, gradient)`` items (``None``: no gradient) that may still be
        arriving; see ``RemoteAdamax``. Each gradient is cut into its shards' slices as it comes
        and every shard's stage sends them at once (its bulk channel; over gRPC a stage waits for
        its slices), then the push is committed at the leader. ``num_tensors`` must count every
        variable of the job (as the adapters push); a stream of some variables only is collected
        first. ``nbytes`` (one server's shared-memory hint) is not used: each shard's part is
        sized from the placement.
        """
        del nbytes
        placement = self._need_placement()
        deadline = time.monotonic() + float(timeout or self.timeout)  # type: ignore[attr-defined]
        streams = ShardStreams(self.key, placement, deadline)
        if int(num_tensors) != len(placement.variables):
            streams.feed(items, int(num_tensors))  # which shards get what is not known up front
            return self._staged_push(streams.collected(), step, request_id, timeout)
        return self._staged_push(streams.parts(), step, request_id, timeout,
                                 feed=lambda: streams.feed(items, int(num_tensors)))  # fmt: skip

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


class ShardStreams:
    """One push's gradients, arriving one by one, cut into every shard's slices as they come.

    ``parts()[i]`` is shard ``i``'s part: an iterable that yields its slices as ``feed`` cuts
    them (waiting for the next one), iterable again for a retry, with ``len`` (the tensors the
    shard gets: one per piece it holds) and ``nbytes`` (their room in a shared-memory segment)
    known from the placement. If ``feed`` fails, every part raises, so each shard's bulk push
    is cut and nothing is staged.
    """

    def __init__(self, key: str, placement: Placement, deadline: float) -> None:
        self.key = key
        self._placement = placement
        self._known = placement.by_name()
        self._deadline = deadline
        self._cond = threading.Condition()
        n = placement.num_shards
        self._slices: list[list[tuple[str, Any]]] = [[] for _ in range(n)]
        self._count = [0] * n
        self._nbytes = [0] * n
        for v in placement.variables:
            for p in v.pieces:
                self._count[p.shard] += 1
                a, b = v.element_range(p)
                self._nbytes[p.shard] += -(-(b - a) * np.dtype(v.dtype).itemsize // _ALIGN) * _ALIGN
        self._done = False
        self._error: BaseException | None = None

    def parts(self) -> list[_Part]:
        return [_Part(self, i) for i in range(len(self._slices))]

    def collected(self) -> list[list[tuple[str, Any]]]:
        """Every shard's slices, once ``feed`` returned (a push of some variables only)."""
        return [list(s) for s in self._slices]

    def feed(self, items: Iterable[tuple[str, Any]], num_tensors: int) -> None:
        """Cut every item into its shards' slices as it arrives (in this thread)."""
        seen: set[str] = set()
        try:
            for name, g in items:
                if name not in self._known:
                    raise NotFoundError(f"optimizer '{self.key}' has no variable '{name}'. Known variables: {list(self._known)}")
                if name in seen:
                    raise InvalidArgumentError(f"The push carries two gradients for variable '{name}'.")
                seen.add(name)
                value = g if (g is None or isinstance(g, _wire.RowSparse)) else np.asarray(g)
                cut = split_gradient(self._known[name], value)  # this variable's pieces only
                with self._cond:
                    for shard, piece in cut:
                        self._slices[shard].append((name, piece))
                    self._cond.notify_all()
            if len(seen) != num_tensors:
                raise InvalidArgumentError(f"the push announced {num_tensors} tensors but carried {len(seen)}")
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            raise
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _next(self, i: int, k: int) -> tuple[str, Any] | None:
        """Shard ``i``'s slice ``k``, waiting for it; None after the last."""
        with self._cond:
            while k >= len(self._slices[i]) and not self._done:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceededError(f"the gradients of a push to optimizer '{self.key}' did not all arrive in time")
                self._cond.wait(remaining)
            if self._error is not None:
                raise RuntimeError(f"the push's gradients failed while being sent: {self._error!r}") from self._error
            return self._slices[i][k] if k < len(self._slices[i]) else None


class _Part:
    """Shard ``i``'s slices of a ``ShardStreams`` push (see there)."""

    def __init__(self, streams: ShardStreams, i: int) -> None:
        self._streams = streams
        self._i = i

    def __len__(self) -> int:
        return self._streams._count[self._i]

    @property
    def nbytes(self) -> int:
        return self._streams._nbytes[self._i]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        k = 0
        while (item := self._streams._next(self._i, k)) is not None:
            yield item
            k += 1
