"""Keras-exact learning rate schedules, implemented with numpy only.

This module re-implements the six built-in learning rate schedules of Keras 3
(``keras.optimizers.schedules``) so that the parameter server can evaluate a
schedule for a given optimizer step *without* importing Keras, and obtain the
very same bits that Keras computes with its numpy backend
(``KERAS_BACKEND=numpy``):

* :class:`ExponentialDecay`
* :class:`PiecewiseConstantDecay`
* :class:`PolynomialDecay`
* :class:`InverseTimeDecay`
* :class:`CosineDecay` (optionally with a linear warmup)
* :class:`CosineDecayRestarts` (SGDR)

Bit-exactness is obtained by reproducing, operation by operation, what the
Keras numpy backend does:

* Python scalars are turned into 0-d arrays by ``convert_to_tensor``, whose
  dtype comes from Keras's JAX-like type promotion lattice (a Python ``float``
  becomes ``float32``, a Python ``int`` becomes ``int32``, and 64-bit dtypes
  are narrowed to 32 bits: ``float64 -> float32``, ``int64 -> int32``).
* Binary ``keras.ops`` functions (``add``, ``multiply``, ``power``, ...)
  promote both operands with the same lattice before calling numpy; plain
  Python operators used by Keras (``a / b``, ``1.0 - x``) are plain numpy
  operators (NEP 50 promotion), so we use plain operators at those places.
* ``floor``/``ceil``/``cos``/``log`` compute in a floating dtype derived from
  the input dtype.

Keras's ``floatx`` is assumed to be ``"float32"`` (the default).

``name`` is metadata only. Keras opens a name scope with it when called, so a
Keras schedule whose name is ``None`` or contains ``"/"`` raises
``ValueError`` on every call; these schedules accept such names and compute
as usual.

The optimizer step may be any Python or numpy integer; it is converted to a
0-d ``int64`` array (the server's step counter) and used the way Keras uses
its optimizer's ``iterations`` variable.  Keras keeps that counter in
``int32`` with the numpy backend, which gives identical results for every
step below ``2**31`` (all integer comparisons and int -> float conversions
agree); beyond that Keras's counter would overflow while ours keeps counting.

Configuration and serialization are compatible with Keras:
``schedule.get_config()`` returns the same dict as Keras's ``get_config()``,
:func:`serialize` returns what ``keras.optimizers.schedules.serialize``
returns, :func:`deserialize` accepts that dict (and the legacy
``{"class_name": ..., "config": ...}`` form), and :func:`from_keras_object`
converts a live Keras schedule object (duck typed, Keras is never imported).

Only numpy and the standard library are used.
"""

from __future__ import annotations

from adamax_server.optim.schedules.decays import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    PiecewiseConstantDecay,
    PolynomialDecay,
)
from adamax_server.optim.schedules.serialization import (
    SUPPORTED_SCHEDULES,
    deserialize,
    from_keras_object,
    serialize,
)

__all__ = [
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "SUPPORTED_SCHEDULES",
    "deserialize",
    "from_keras_object",
    "serialize",
]
