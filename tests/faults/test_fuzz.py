"""Fuzzing a live server: malformed requests of every RPC, then random bytes.

Hypothesis builds request messages and frame streams field by field (open enums with unknown
values, negative and huge dimensions, byte lengths that disagree with shapes, chunks in the
wrong place, names that do not exist) and sends each to a server on 127.0.0.1. For every
request: the status is never UNKNOWN or INTERNAL (an unhandled exception), and when the call
fails the hosted optimizer's state (variables, slots, version, iterations, open round) is
bit-for-bit unchanged. Afterwards the server still serves well-formed calls.

Examples are derandomized so a run is reproducible; ``ADAMAX_PS_FUZZ_EXAMPLES`` scales them.
"""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _ps_helpers import assert_same_state, running_server, snapshot

from adamax_client import RemoteAdamax
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

EXAMPLES = int(os.environ.get("ADAMAX_PS_FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
VICTIM = "m"
INITIAL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), "b": np.zeros(4, np.float32),
           "e": np.ones((5, 2), np.float32)}


class Live:
    """The server, a raw channel, and the state check around every call."""

    def __init__(self, target, coordinator):
        self.target, self.coordinator = target, coordinator
        self.channel = grpc.insecure_channel(target)
        self.calls = 0
        self.codes: dict[str, int] = {}

    def state(self):
        return snapshot(self.coordinator.get(VICTIM))

    def call(self, method: str, request, service: str = "AdamaxService"):
        """Send ``request`` (a message, bytes, or a list of frames/bytes) and check the outcome."""
        desc = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        path = f"/{pb.DESCRIPTOR.package}.{service}/{method}"
        kind = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                (True, False): self.channel.stream_unary, (True, True): self.channel.stream_stream}[
            (desc.client_streaming, desc.server_streaming)]
        stub = kind(path, request_serializer=_to_bytes, response_deserializer=lambda b: b)
        before = self.state()
        try:
            reply = stub(iter(request) if desc.client_streaming else request, timeout=5)
            if desc.server_streaming:
                list(reply)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code not in BAD_CODES, f"{method}: {code} {exc.details()}"
            assert_same_state(before, self.state())  # a refused request changes nothing
        if code == grpc.StatusCode.OK:  # accepted input must leave the state usable
            for key, value in self.state().items():
                if value.dtype.kind == "f":
                    assert np.isfinite(value).all(), f"{method} made {key} non-finite"
        self.calls += 1
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        return code


def _to_bytes(item):
    return item if isinstance(item, (bytes, bytearray)) else item.SerializeToString()


@pytest.fixture(scope="module")
def live():
    with running_server(max_workers=8) as (target, coordinator):
        with RemoteAdamax(target, name=VICTIM, worker_id="setup", learning_rate=0.01) as remote:
            remote.build(INITIAL)
            remote.apply({"w": np.ones((3, 2), np.float32)})  # version 1: pulls with min_version<=1 never wait
        yield Live(target, coordinator)


# ---------------------------------------------------------------- strategies

names = st.one_of(st.sampled_from([VICTIM, "", "nope", "other"]), st.text(max_size=12))
var_names = st.one_of(st.sampled_from(["w", "b", "e", "x", ""]), st.text(max_size=6))
small_ints = st.integers(min_value=-3, max_value=12)
big_ints = st.one_of(small_ints, st.sampled_from([2**31, 2**62, -(2**62)]))
enum_values = st.integers(min_value=-1, max_value=7)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-3, 1e300]))

tensor_headers = st.builds(
    pb.TensorHeader,
    name=var_names,
    dtype=enum_values,
    shape=st.lists(st.one_of(st.integers(-2, 6), st.sampled_from([2**40])), max_size=4),
    nbytes=st.one_of(st.integers(-8, 200), st.sampled_from([24, 16, 40, 2**40])),
    layout=enum_values,
    num_rows=st.integers(-2, 6),
    absent=st.booleans(),
    group=enum_values,
)


def _payload(data: bytes, kind: str) -> bytes:
    """Chunk payloads: random bytes, or well-formed float32/int64 values (NaN and Inf included)."""
    if kind == "float32":
        return np.frombuffer(data[: len(data) // 4 * 4], np.uint8).tobytes() or np.float32([np.nan]).tobytes()
    return data


chunks = st.builds(_payload, st.binary(max_size=64), st.sampled_from(["raw", "float32"]))


def _frame(kind: str, value) -> bytes:
    if kind == "tensor":
        return _wire.message_frame(_wire.TENSOR_FIELD, value)
    if kind == "chunk":
        return b"".join(_wire.chunk_frames([memoryview(value)], chunk_bytes=1 << 20)) or b"\x7a\x00"
    return _wire.header_frame(value)


def stream_of(header_strategy):
    """A header (usually first), then a random mix of tensor headers and chunks."""
    item = st.one_of(
        st.tuples(st.just("tensor"), tensor_headers),
        st.tuples(st.just("chunk"), chunks),
        st.tuples(st.just("header"), header_strategy),
        st.tuples(st.just("raw"), st.binary(max_size=20)),
    )
    return st.builds(
        lambda head, rest: ([] if head is None else [_frame("header", head)]) + [v if k == "raw" else _frame(k, v) for k, v in rest],
        st.one_of(st.none(), header_strategy, header_strategy, header_strategy),
        st.lists(item, max_size=8),
    )


refs = st.builds(pb.OptimizerRef, optimizer=names)
push_headers = st.builds(pb.PushHeader, optimizer=names, worker_id=st.text(max_size=8),
                         step=st.one_of(small_ints, st.sampled_from([2**62, -(2**62)])), request_id=st.text(max_size=8))
policies = st.builds(
    pb.CoordinationPolicy, mode=enum_values, num_workers=st.integers(0, 2**32 - 1), min_workers=st.integers(0, 5),
    aggregation=enum_values, round_timeout_seconds=floats, round_timeout_policy=enum_values, non_finite=enum_values,
)
config_json = st.one_of(
    st.text(max_size=20),
    st.dictionaries(
        st.sampled_from(["learning_rate", "beta_1", "beta_2", "epsilon", "clipnorm", "clipvalue", "global_clipnorm",
                         "weight_decay", "use_ema", "ema_momentum", "gradient_accumulation_steps", "name", "bogus",
                         "loss_scale_factor", "ema_overwrite_frequency"]),
        st.one_of(floats, st.integers(-5, 5), st.booleans(), st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                  st.just({"class_name": "ExponentialDecay", "config": {"initial_learning_rate": "x"}})),
        max_size=4,
    ).map(lambda d: json.dumps(d)),
)

STREAMS = {
    "Build": stream_of(st.builds(pb.BuildHeader, optimizer=names, worker_id=st.text(max_size=6))),
    "Push": stream_of(push_headers),
    "Assign": stream_of(st.builds(pb.AssignHeader, optimizer=names, op=enum_values)),
    "SetWeights": stream_of(refs),
    "LoadOwnVariables": stream_of(refs),
    "StatelessApply": stream_of(refs),
}
UNARY = {
    "CreateOptimizer": st.builds(pb.CreateOptimizerRequest, optimizer=names, config_json=config_json, policy=policies),
    "GetOptimizer": refs,
    "ListOptimizers": st.just(pb.ListOptimizersRequest()),
    "DeleteOptimizer": st.builds(pb.OptimizerRef, optimizer=st.sampled_from(["", "nope", "other"])),
    "SetLearningRate": st.builds(pb.SetLearningRateRequest, optimizer=names, learning_rate=floats),
    "ExcludeFromWeightDecay": st.builds(pb.ExcludeFromWeightDecayRequest, optimizer=names,
                                        var_names=st.lists(st.text(max_size=4), max_size=2),
                                        var_list=st.lists(var_names, max_size=2)),
    "FinalizeVariableValues": refs,
    "SaveOwnVariables": refs,
    "Pull": st.builds(pb.PullRequest, optimizer=names, names=st.lists(var_names, max_size=3),
                      min_version=st.integers(-2, 1), worker_id=st.text(max_size=4)),
}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("method", sorted(STREAMS))
def test_malformed_streams(live, method):
    @FUZZ
    @given(frames=STREAMS[method])
    def run(frames):
        live.call(method, frames)

    run()


@pytest.mark.parametrize("method", sorted(UNARY))
def test_malformed_unary_requests(live, method):
    @settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
    @given(request=UNARY[method])
    def run(request):
        live.call(method, request)

    run()


def test_random_bytes_to_every_method(live):
    methods = sorted(pb.DESCRIPTOR.services_by_name["AdamaxService"].methods_by_name)

    @settings(FUZZ, max_examples=EXAMPLES * 2)
    @given(method=st.sampled_from(methods), frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    def run(method, frames):
        desc = pb.DESCRIPTOR.services_by_name["AdamaxService"].methods_by_name[method]
        live.call(method, frames if desc.client_streaming else frames[0])

    run()


def test_server_still_serves_and_nothing_leaked(live):
    """Runs last (file order): well-formed calls still work after the fuzzing."""
    assert live.calls >= 1 or os.environ.get("PYTEST_XDIST_WORKER")
    host = live.coordinator.get(VICTIM)
    with RemoteAdamax(live.target, name=VICTIM, worker_id="after", learning_rate=0.01) as remote:
        remote.attach()
        version = remote.version
        result = remote.apply({"w": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)})
        assert result.outcome == "applied" and result.version == version + 1
        assert np.isfinite(remote.pull()["w"]).all()
    assert not [e for entries in host._leader._dedup._by_worker.values() for e in entries.values() if e.result is None]
    print(f"fuzzed {live.calls} requests: {dict(sorted(live.codes.items()))}")


# ---------------------------------------------------------------- the checkpoint service


@pytest.fixture(scope="module")
def live_checkpoints(tmp_path_factory):
    """A server with a checkpoint directory holding one good checkpoint of the victim."""
    from adamax_server.storage.checkpoint import CheckpointStore
    from adamax_server.storage.checkpointing import CheckpointManager
    from adamax_server.sharding.coordinator import Coordinator

    coordinator = Coordinator(device="cpu")
    manager = CheckpointManager(coordinator, CheckpointStore(tmp_path_factory.mktemp("ckpt")))
    with running_server(coordinator=coordinator, checkpoints=manager, max_workers=8) as (target, _):
        with RemoteAdamax(target, name=VICTIM, worker_id="setup", learning_rate=0.01) as remote:
            remote.build(INITIAL)
            remote.apply({"w": np.ones((3, 2), np.float32)})
        manager.save_all("fuzz baseline")
        yield Live(target, coordinator)


checkpoint_ids = st.one_of(
    st.sampled_from(["latest", "", "ckpt-00000001", "ckpt-99999999", "..", "../x", "/etc/passwd", "a/b", "ckpt-1\x00"]),
    st.text(max_size=12),
)
manifests = st.one_of(
    st.text(max_size=30),
    st.dictionaries(st.sampled_from(["format_version", "optimizers", "created_unix", "sha256", "reason", "x"]),
                    st.one_of(st.integers(-2, 3), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.none()),
                    max_size=4).map(json.dumps),
)
CHECKPOINT_UNARY = {
    "SaveCheckpoint": st.builds(pb.SaveCheckpointRequest, reason=st.text(max_size=10)),
    "ListCheckpoints": st.just(pb.ListCheckpointsRequest()),
    "InspectCheckpoint": st.builds(pb.InspectCheckpointRequest, checkpoint_id=checkpoint_ids, verify=st.booleans()),
    "RestoreCheckpoint": st.builds(pb.RestoreCheckpointRequest, checkpoint_id=checkpoint_ids,
                                   optimizers=st.lists(names, max_size=2)),
    "DownloadCheckpoint": st.builds(pb.DownloadCheckpointRequest, checkpoint_id=checkpoint_ids,
                                    optimizers=st.lists(names, max_size=2)),
}
CHECKPOINT_STREAMS = {
    "UploadCheckpoint": stream_of(st.builds(pb.CheckpointHeader, checkpoint_id=checkpoint_ids, manifest_json=manifests,
                                            total_bytes=big_ints, restore=st.booleans(), save=st.booleans())),
}


@pytest.mark.parametrize("method", sorted(CHECKPOINT_UNARY))
def test_malformed_checkpoint_requests(live_checkpoints, method):
    @settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
    @given(request=CHECKPOINT_UNARY[method])
    def run(request):
        live_checkpoints.call(method, request, service="CheckpointService")

    run()


def test_malformed_checkpoint_uploads(live_checkpoints):
    @FUZZ
    @given(frames=CHECKPOINT_STREAMS["UploadCheckpoint"])
    def run(frames):
        live_checkpoints.call("UploadCheckpoint", frames, service="CheckpointService")

    run()


def test_random_bytes_to_every_checkpoint_method(live_checkpoints):
    service = pb.DESCRIPTOR.services_by_name["CheckpointService"]

    @settings(FUZZ, max_examples=EXAMPLES)
    @given(method=st.sampled_from(sorted(service.methods_by_name)),
           frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    def run(method, frames):
        desc = service.methods_by_name[method]
        live_checkpoints.call(method, frames if desc.client_streaming else frames[0], service="CheckpointService")

    run()


def test_checkpoint_server_still_serves_after_fuzzing(live_checkpoints):
    with RemoteAdamax(live_checkpoints.target, name=VICTIM, worker_id="after", learning_rate=0.01) as remote:
        remote.attach()
        version = remote.version
        assert remote.apply({"w": np.ones((3, 2), np.float32)}).version == version + 1
    print(f"fuzzed {live_checkpoints.calls} checkpoint requests: {dict(sorted(live_checkpoints.codes.items()))}")
