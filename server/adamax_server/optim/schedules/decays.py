"""The six built-in Keras learning-rate schedules over numpy (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adamax_server.optim.schedules._ops import (
    Number,
    Step,
    _add,
    _as_step,
    _ceil,
    _cos,
    _divide,
    _floor,
    _log,
    _minimum,
    _multiply,
    _power,
    _subtract,
    _tensor,
    _where,
)

# ---------------------------------------------------------------------------


def _check_positive(arg_name: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(
            f"Argument `{arg_name}` must be > 0. "
            f"Received: {arg_name}={value}"
        )


class LearningRateSchedule:
    """Base class of the learning rate schedules.

    A schedule is a callable mapping the optimizer step (the number of
    updates already applied, an ``int64`` counter) to a learning rate, a numpy
    scalar or 0-d array bit-identical to what Keras's schedule returns.
    """

    def __call__(self, step: Step) -> Any:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' "
            "must override `__call__(self, step)`."
        )

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments, exactly as Keras does."""
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' "
            "must override `get_config()` in order to be serializable."
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LearningRateSchedule:
        """Instantiate a schedule from the output of ``get_config()``."""
        return cls(**config)

    def __repr__(self) -> str:
        try:
            config = self.get_config()
            args = ", ".join(f"{k}={v!r}" for k, v in config.items())
        except NotImplementedError:
            args = ""
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """Exponential decay.

    ``lr(step) = initial_learning_rate * decay_rate ** (step / decay_steps)``

    With ``staircase=True`` the exponent is ``floor(step / decay_steps)``.
    Everything is computed in the dtype of ``initial_learning_rate`` once
    converted by Keras's rules (``float32`` for a Python float).

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        decay_rate: Number,
        staircase: bool = False,
        name: str | None = "ExponentialDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _tensor(self.decay_steps, dtype)
        decay_rate = _tensor(self.decay_rate, dtype)
        exponent = _tensor(step, dtype) / decay_steps
        if self.staircase:
            exponent = _floor(exponent)
        return _multiply(lr0, _power(decay_rate, exponent))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class PiecewiseConstantDecay(LearningRateSchedule):
    """Piecewise constant learning rate.

    ``lr(step) = values[0]`` if ``step <= boundaries[0]``,
    ``values[i]`` if ``boundaries[i-1] < step <= boundaries[i]``,
    ``values[-1]`` if ``step > boundaries[-1]``.

    As in Keras, the result is computed as the sum over the intervals of
    ``cast(step in interval) * value`` accumulated in the dtype of
    ``values[0]``, and boundaries are cast to the step's integer dtype
    (so a float boundary is truncated). Mixing an integer ``values[0]`` with
    float later values fails with numpy's casting error, exactly as in Keras.

    Raises:
        ValueError: if ``len(boundaries) != len(values) - 1``.
    """

    def __init__(
        self,
        boundaries: Sequence[Number],
        values: Sequence[Number],
        name: str | None = "PiecewiseConstant",
    ) -> None:
        super().__init__()
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of "
                f"values. Received: boundaries={boundaries} of length "
                f"{len(boundaries)}, and values={values} "
                f"of length {len(values)}."
            )
        self.boundaries = boundaries
        self.values = values
        self.name = name

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        edges = [_tensor(b) for b in self.boundaries]
        levels = [_tensor(v) for v in self.values]
        edges = [
            e if e.dtype == step.dtype else _tensor(e, step.dtype)
            for e in edges
        ]
        out_dtype = levels[0].dtype
        total = np.array(0, dtype=out_dtype)
        total += _tensor(step <= edges[0], out_dtype) * levels[0]
        total += _tensor(step > edges[-1], out_dtype) * levels[-1]
        for low, high, level in zip(edges[:-1], edges[1:], levels[1:-1]):
            total += _tensor((step > low) & (step <= high), out_dtype) * level
        return total

    def get_config(self) -> dict[str, Any]:
        return {
            "boundaries": self.boundaries,
            "values": self.values,
            "name": self.name,
        }


class PolynomialDecay(LearningRateSchedule):
    """Polynomial decay from the initial to the end learning rate.

    Without cycling (``s = min(step, decay_steps)``)::

        lr(step) = (initial - end) * (1 - s / decay_steps) ** power + end

    With ``cycle=True`` the horizon becomes
    ``decay_steps * ceil(step / decay_steps)`` (``decay_steps`` at step 0)
    and ``step`` is not clipped.

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        end_learning_rate: Number = 0.0001,
        power: Number = 1.0,
        cycle: bool = False,
        name: str | None = "PolynomialDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        lr_end = _tensor(self.end_learning_rate, dtype)
        power = _tensor(self.power, dtype)
        s = _tensor(step, dtype)
        horizon = _tensor(self.decay_steps, dtype)
        if self.cycle:
            cycles = _where(
                np.equal(s, 0),
                1.0,
                _ceil(s / self.decay_steps),
            )
            horizon = _multiply(horizon, cycles)
        else:
            s = _minimum(s, horizon)
        fraction = _divide(s, horizon)
        return _add(
            _multiply(lr0 - lr_end, _power(1 - fraction, power)),
            lr_end,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
            "name": self.name,
        }


class InverseTimeDecay(LearningRateSchedule):
    """Inverse time decay.

    ``lr(step) = initial_learning_rate
    / (1 + decay_rate * step / decay_steps)``

    With ``staircase=True``, ``step / decay_steps`` is replaced by
    ``floor(step / decay_steps)``.

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        decay_rate: Number,
        staircase: bool = False,
        name: str | None = "InverseTimeDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _tensor(self.decay_steps, dtype)
        decay_rate = _tensor(self.decay_rate, dtype)
        progress = _tensor(step, dtype) / decay_steps
        if self.staircase:
            progress = _floor(progress)
        one = _tensor(_tensor(1), dtype)
        return _divide(lr0, _add(one, _multiply(decay_rate, progress)))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class CosineDecay(LearningRateSchedule):
    """Cosine decay, with an optional linear warmup.

    Without warmup (``warmup_target is None``), with
    ``s = min(step, decay_steps)``::

        cosine = 0.5 * (1 + cos(pi * s / decay_steps))
        lr(step) = initial_learning_rate * ((1 - alpha) * cosine + alpha)

    With warmup, ``s = min(step, warmup_steps + decay_steps)``; while
    ``s < warmup_steps``::

        lr(step) = (warmup_target - initial_learning_rate)
                   * (s / warmup_steps) + initial_learning_rate

    and afterwards the cosine formula above runs on ``s - warmup_steps``,
    starting from ``warmup_target`` instead of ``initial_learning_rate``.

    Note the positional order of the arguments (``name`` comes before the
    warmup arguments), as in Keras. ``warmup_target`` is cast to the dtype of
    ``initial_learning_rate``.

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        alpha: Number = 0.0,
        name: str | None = "CosineDecay",
        warmup_target: Number | None = None,
        warmup_steps: Number = 0,
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name
        self.warmup_steps = warmup_steps
        self.warmup_target = warmup_target
        _check_positive("decay_steps", decay_steps)

    def _decay(
        self, s: Any, decay_steps: Any, start_lr: Any, dtype: Any
    ) -> Any:
        fraction = _divide(s, decay_steps)
        pi = _tensor(math.pi, dtype)
        cosine = 0.5 * (1.0 + _cos(_multiply(pi, fraction)))
        scaled = (1 - self.alpha) * cosine + self.alpha
        return _multiply(start_lr, scaled)

    @staticmethod
    def _warmup(s: Any, warmup_steps: Any, target: Any, lr0: Any) -> Any:
        fraction = s / warmup_steps
        delta = target - lr0
        return delta * fraction + lr0

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _tensor(self.decay_steps, dtype)
        s = _tensor(step, dtype)
        if self.warmup_target is None:
            s = _minimum(s, decay_steps)
            return self._decay(s, decay_steps, lr0, dtype)
        target = _tensor(self.warmup_target, dtype)
        warmup_steps = _tensor(self.warmup_steps, dtype)
        s = _minimum(s, decay_steps + warmup_steps)
        if s < warmup_steps:
            return self._warmup(s, warmup_steps, target, lr0)
        return self._decay(s - warmup_steps, decay_steps, target, dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR, Loshchilov & Hutter).

    With ``f = step / first_decay_steps``, the restart index ``i`` and the
    fraction ``r`` of the current period are::

        t_mul == 1:  i = floor(f);  r = f - i
        t_mul != 1:  i = floor(log(1 - f * (1 - t_mul)) / log(t_mul))
                     r = (f - (1 - t_mul ** i) / (1 - t_mul)) / t_mul ** i

    and::

        cosine = 0.5 * m_mul ** i * (1 + cos(pi * r))
        lr(step) = initial_learning_rate * ((1 - alpha) * cosine + alpha)

    Raises:
        ValueError: if ``first_decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        first_decay_steps: Number,
        t_mul: Number = 2.0,
        m_mul: Number = 1.0,
        alpha: Number = 0.0,
        name: str | None = "SGDRDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.first_decay_steps = first_decay_steps
        self.t_mul = t_mul
        self.m_mul = m_mul
        self.alpha = alpha
        self.name = name
        _check_positive("first_decay_steps", first_decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        first_steps = _tensor(self.first_decay_steps, dtype)
        alpha = _tensor(self.alpha, dtype)
        t_mul = _tensor(self.t_mul, dtype)
        m_mul = _tensor(self.m_mul, dtype)
        fraction = _tensor(step, dtype) / first_steps

        if np.equal(t_mul, 1.0):
            restart = _floor(fraction)
            fraction = fraction - restart
        else:
            # Keras re-casts the log argument to `dtype` before taking it.
            growth = _tensor(1.0 - fraction * (1.0 - t_mul), dtype)
            restart = _floor(_log(growth) / _log(t_mul))
            elapsed = _divide(1.0 - _power(t_mul, restart), (1.0 - t_mul))
            fraction = _divide(
                _subtract(fraction, elapsed), _power(t_mul, restart)
            )

        amplitude = _power(m_mul, restart)
        pi = _tensor(math.pi, dtype)
        cosine = 0.5 * amplitude * (1.0 + _cos(_multiply(pi, fraction)))
        scaled = _add(_multiply((1 - alpha), cosine), alpha)
        return _multiply(lr0, scaled)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "first_decay_steps": self.first_decay_steps,
            "t_mul": self.t_mul,
            "m_mul": self.m_mul,
            "alpha": self.alpha,
            "name": self.name,
        }
