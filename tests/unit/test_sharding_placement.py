"""Placement: deterministic, balanced by bytes, small variables whole, big ones split by rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adamax_server.sharding.placement import DEFAULT_MIN_PIECE_BYTES, Placement, place


def transformer_specs(layers: int = 12, d: int = 768, vocab: int = 50_257):
    """A GPT-2-small-like variable list: one large embedding table and a stack of blocks."""
    specs = [("wte", (vocab, d), "float32"), ("wpe", (1024, d), "float32")]
    for i in range(layers):
        specs += [
            (f"h{i}/ln_1/gamma", (d,), "float32"),
            (f"h{i}/ln_1/beta", (d,), "float32"),
            (f"h{i}/attn/c_attn/kernel", (d, 3 * d), "float32"),
            (f"h{i}/attn/c_attn/bias", (3 * d,), "float32"),
            (f"h{i}/attn/c_proj/kernel", (d, d), "float32"),
            (f"h{i}/attn/c_proj/bias", (d,), "float32"),
            (f"h{i}/ln_2/gamma", (d,), "float32"),
            (f"h{i}/ln_2/beta", (d,), "float32"),
            (f"h{i}/mlp/c_fc/kernel", (d, 4 * d), "float32"),
            (f"h{i}/mlp/c_fc/bias", (4 * d,), "float32"),
            (f"h{i}/mlp/c_proj/kernel", (4 * d, d), "float32"),
            (f"h{i}/mlp/c_proj/bias", (d,), "float32"),
        ]
    specs += [("ln_f/gamma", (d,), "float32"), ("ln_f/beta", (d,), "float32")]
    return specs


def _check_tiling(placement: Placement, specs) -> None:
    assert [v.name for v in placement.variables] == [n for n, _, _ in specs]
    for v in placement.variables:
        rows = v.shape[0] if v.shape else 1
        assert v.pieces[0].row_start == 0 and v.pieces[-1].row_stop == rows
        for p, q in zip(v.pieces, v.pieces[1:]):
            assert p.row_stop == q.row_start and p.shard < q.shard
        for p in v.pieces:
            assert 0 <= p.shard < placement.num_shards
    shards = [p.shard for v in placement.variables for p in v.pieces]
    assert shards == sorted(shards)  # each shard holds a contiguous run of the build order


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 5, 8, 16])
def test_realistic_model_is_balanced(num_shards):
    specs = transformer_specs()
    placement = place(specs, num_shards)
    _check_tiling(placement, specs)
    assert placement.imbalance() <= 1.1, placement.shard_bytes()
    total = sum(int(np.prod(s)) * 4 for _, s, _ in specs)
    assert sum(placement.shard_bytes()) == total


def test_small_variables_stay_whole_and_pieces_respect_the_minimum():
    specs = transformer_specs(layers=4, d=256, vocab=8_000)
    placement = place(specs, 5)
    for v in placement.variables:
        nbytes = int(np.prod(v.shape)) * 4
        if nbytes < 2 * DEFAULT_MIN_PIECE_BYTES:
            assert not v.split, v.name
        for p in v.pieces if v.split else ():
            a, b = v.element_range(p)
            assert (b - a) * 4 >= DEFAULT_MIN_PIECE_BYTES
    assert any(v.split for v in placement.variables)
    assert placement.imbalance() <= 1.1


def test_one_shard_holds_everything_whole():
    specs = transformer_specs(layers=2)
    placement = place(specs, 1)
    assert all(len(v.pieces) == 1 and v.pieces[0].shard == 0 for v in placement.variables)
    assert placement.imbalance() == 1.0


def test_deterministic_and_recorded():
    specs = transformer_specs(layers=3)
    a = place(specs, 4)
    b = place(list(specs), 4)
    assert a == b
    again = Placement.from_json(json.dumps(a.to_json()))
    assert again == a


def test_tiny_models_scalars_and_empty_variables():
    specs = [("s", (), "float32"), ("e", (0, 3), "float32"), ("b", (3,), "float64"), ("w", (4, 2), "float32")]
    for k in (1, 2, 3, 7):
        placement = place(specs, k)
        _check_tiling(placement, specs)
        assert all(not v.split for v in placement.variables)  # all below the minimum piece size
    # With a tiny minimum, a 2-row variable can be split.
    placement = place([("w", (2, 1000), "float32")], 2, min_piece_bytes=1)
    assert [(p.shard, p.row_start, p.row_stop) for p in placement.variables[0].pieces] == [(0, 0, 1), (1, 1, 2)]


def test_one_huge_table_is_spread_over_all_shards():
    placement = place([("table", (1_000_003, 64), "float32")], 7)
    v = placement.variables[0]
    assert [p.shard for p in v.pieces] == list(range(7))
    assert placement.imbalance() < 1.0001


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_shards"):
        place([], 0)
    with pytest.raises(ValueError, match="min_piece_bytes"):
        place([], 2, min_piece_bytes=0)
