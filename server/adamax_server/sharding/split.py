"""Cutting a job's arrays into per-shard pieces and putting them back (see ``adamax_wire.placement``).

The pure functions live with the placement in the package both sides import; this module adds
``job_layout``, which needs the engine: the whole job's optimizer variables in Keras's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adamax_wire.placement import assemble, assemble_store, split_gradients, split_store, split_values

from adamax_server.optim.engine import Adamax

__all__ = ["assemble", "assemble_store", "job_layout", "split_gradients", "split_store", "split_values"]


def job_layout(
    config: Mapping[str, Any], specs: Sequence[tuple[str, Sequence[int], Any]], exclusions: Mapping[str, Any] | None = None
) -> list[tuple[str, str, str]]:
    """The whole job's optimizer variables in Keras's order: (name, kind, variable name or "").

    Computed with an engine built on zero-row stand-ins of the variables, so names and order
    (unique-name suffixes included) are exactly the single-server engine's.
    """
    engine = Adamax.from_config(dict(config), device="numpy")
    stand_ins = {n: np.zeros((0, *tuple(s)[1:]) if len(tuple(s)) else (), dtype=dt) for n, s, dt in specs}
    engine.build(stand_ins)
    names = [v.name for v in engine._vars]
    return [(ov.name, ov.kind, names[ov.var] if ov.kind == "slot" else "") for ov in engine._opt_vars]
