"""``push_stream`` on a sharded job streams to every shard at once (``sharding_calls.ShardStreams``).

Each gradient is cut into its shards' slices as the caller's iterable yields it, and every
shard's bulk channel sends them while the rest are still being produced (what the framework
adapters rely on to overlap backward with the transfer); the commit follows. Results equal a
plain ``push`` of the same gradients, bit for bit; a stream that fails half way applies nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_server.sharding.shard import ShardHost
from _sharding_helpers import remote_values, start_shard_servers, stop_shard_servers


def _dense_grads(values, k):
    rng = np.random.default_rng(200 + k)
    return {n: (rng.standard_normal(np.shape(v)) * 3).astype(v.dtype) for n, v in values.items()}


def _pair(targets, bulk, **kwargs):
    common = dict(timeout=30, learning_rate=0.01, global_clipnorm=0.5, bulk=bulk, **kwargs)
    return (RemoteAdamax(targets, worker_id="w", optimizer="streamed", **common),
            RemoteAdamax(targets, worker_id="w", optimizer="pushed", **common))  # fmt: skip


def _same(a, b, values):
    got, want = a.pull(), b.pull()
    for n in values:
        assert got[n].tobytes() == want[n].tobytes(), n


@pytest.mark.parametrize("shards", [1, 3])
def test_every_shard_receives_while_the_gradients_are_still_arriving(shards, monkeypatch):
    servers, targets = start_shard_servers(shards)
    values = remote_values(11)
    receiving: set[int] = set()
    all_receiving = threading.Event()
    original = ShardHost.receive_lookup

    def noting(self, taken):  # a bulk push to this shard started reading its tensors
        if self.key == "streamed":
            receiving.add(self.shard_index)
            if len(receiving) == shards:
                all_receiving.set()
        return original(self, taken)

    monkeypatch.setattr(ShardHost, "receive_lookup", noting)
    streamed, pushed = _pair(targets, "tcp")
    try:
        streamed.build(values)
        pushed.build(values)
        for k in range(3):
            grads = _dense_grads(values, k)
            all_receiving.clear()
            receiving.clear()
            waited = []

            def items(grads=grads):
                names = list(grads)
                yield names[0], grads[names[0]]
                waited.append(all_receiving.wait(20))  # every shard is already receiving
                for name in names[1:]:
                    yield name, grads[name]

            result = streamed.push_stream(items(), num_tensors=len(values))
            assert waited == [True], f"shards {sorted(receiving)} of {shards} started before the stream ended"
            assert result.outcome == pushed.push(grads).outcome == "applied"
        _same(streamed, pushed, values)
    finally:
        streamed.close()
        pushed.close()
        stop_shard_servers(servers)


@pytest.mark.parametrize("bulk", ["off", "auto"])
def test_a_stream_that_fails_half_way_applies_nothing_anywhere(bulk):
    servers, targets = start_shard_servers(3)
    values = remote_values(12)
    streamed, pushed = _pair(targets, bulk)
    try:
        streamed.build(values)
        pushed.build(values)
        grads = _dense_grads(values, 0)

        def broken():
            names = list(grads)
            yield names[0], grads[names[0]]
            raise ValueError("backward failed")

        with pytest.raises(ValueError, match="backward failed"):
            streamed.push_stream(broken(), num_tensors=len(values))

        def unknown():
            yield "nope", np.zeros(3, np.float32)

        with pytest.raises(client_errors.NotFoundError, match="no variable 'nope'"):
            streamed.push_stream(unknown(), num_tensors=len(values))
        with pytest.raises(client_errors.InvalidArgumentError, match="announced 9 tensors but carried 4"):
            streamed.push_stream(iter(grads.items()), num_tensors=9)
        hosts = [s.shard_registry.host("streamed") for s in servers]
        assert [h.version for h in hosts] == [0, 0, 0]  # nothing was applied
        deadline = time.monotonic() + 5  # a cut bulk push stages nothing (the server sees the cut soon)
        while any(h.staged_keys() for h in hosts) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [h.staged_keys() for h in hosts] == [[], [], []]
        # The next push goes through, and equals a plain push.
        assert streamed.push_stream(iter(grads.items()), num_tensors=len(values)).version == 1
        pushed.push(grads)
        _same(streamed, pushed, values)
    finally:
        streamed.close()
        pushed.close()
        stop_shard_servers(servers)


@pytest.mark.parametrize("bulk", ["off", "tcp"])
@pytest.mark.parametrize("where", ["server", "1 shard", "3 shards"])
def test_items_more_or_fewer_than_announced_apply_nothing(where, bulk):
    """A server acts on a push the moment its last announced tensor arrives: an iterable that
    yields one item more after that (or ends early) must still leave nothing applied or staged,
    and say so, over every path (before: over the bulk channel a plain server applied the push
    and the client never noticed the extra item; a one-shard job applied it and raised)."""
    from _ps_helpers import running_server

    values = remote_values(13)
    grads = _dense_grads(values, 0)
    first = next(iter(grads))

    def one_more():
        yield from grads.items()
        time.sleep(0.2)  # every shard already holds its whole part
        yield first, grads[first]

    with contextlib.ExitStack() as stack:
        if where == "server":
            target, _ = stack.enter_context(running_server())
            targets, servers = [target], []
        else:
            servers, targets = start_shard_servers(int(where[0]))
            stack.callback(stop_shard_servers, servers)
        opt = RemoteAdamax(targets, worker_id="w", optimizer="s", timeout=20, learning_rate=0.01, bulk=bulk)
        stack.callback(opt.close)
        opt.build(values)
        with pytest.raises(client_errors.InvalidArgumentError, match=f"announced {len(values)} tensors|two gradients for variable '{first}'"):
            opt.push_stream(one_more(), num_tensors=len(values))
        with pytest.raises(client_errors.InvalidArgumentError, match=f"announced {len(values)} tensors"):
            opt.push_stream(iter(list(grads.items())[:-1]), num_tensors=len(values))
        time.sleep(0.3)  # a push the server took would show by now
        hosts = [s.shard_registry.host("s") for s in servers]
        assert [h.version for h in hosts] == [0] * len(hosts)
        assert [h.staged_keys() for h in hosts] == [[]] * len(hosts)
        assert opt.pull(min_version=0)[first].tobytes() == values[first].tobytes()  # nothing applied
        assert opt.push_stream(iter(grads.items()), num_tensors=len(values)).version == 1  # the channel still works

def test_a_stream_of_some_variables_is_collected_then_pushed():
    servers, targets = start_shard_servers(2)
    values = remote_values(13)
    streamed, pushed = _pair(targets, "auto")
    try:
        streamed.build(values)
        pushed.build(values)
        grads = _dense_grads(values, 1)
        some = {n: grads[n] for n in ("w", "d")}
        assert streamed.push_stream(iter(some.items()), num_tensors=2).outcome == "applied"
        pushed.push(some)
        _same(streamed, pushed, values)
    finally:
        streamed.close()
        pushed.close()
        stop_shard_servers(servers)
