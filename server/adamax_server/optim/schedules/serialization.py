"""Keras-compatible (de)serialization of the schedules, and conversion of Keras schedule objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from adamax_server.optim.schedules.decays import (
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    PiecewiseConstantDecay,
    PolynomialDecay,
)

#: The Keras module under which the built-in schedules are exported.
KERAS_MODULE = "keras.optimizers.schedules"

# ---------------------------------------------------------------------------
# Serialization.
# ---------------------------------------------------------------------------

#: Class name (as Keras serializes it) -> schedule class.
SUPPORTED_SCHEDULES: dict[str, type[LearningRateSchedule]] = {
    cls.__name__: cls
    for cls in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}


def _unknown_schedule(class_name: Any) -> ValueError:
    return ValueError(
        f"Unknown learning rate schedule {class_name!r}. Supported schedules: "
        f"{', '.join(SUPPORTED_SCHEDULES)}."
    )


def _keras_class_name(schedule: LearningRateSchedule) -> str:
    for klass in type(schedule).__mro__:
        if SUPPORTED_SCHEDULES.get(klass.__name__) is klass:
            return klass.__name__
    raise ValueError(
        f"Cannot serialize {type(schedule).__name__!r}: not one of the "
        f"supported schedules ({', '.join(SUPPORTED_SCHEDULES)})."
    )


def _encode(value: Any) -> Any:
    """Encode a config value the way Keras (numpy backend) serializes it."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (np.generic, np.ndarray)):
        # With the numpy backend every numpy value is a "tensor".
        return {
            "class_name": "__tensor__",
            "config": {
                "value": np.asarray(value).tolist(),
                "dtype": np.asarray(value).dtype.name,
            },
        }
    raise TypeError(
        f"Cannot serialize value {value!r} of type {type(value).__name__} "
        "in a learning rate schedule config."
    )


def _decode(value: Any) -> Any:
    """Turn ``__tensor__``/``__numpy__`` entries back into numpy values."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        if value.get("class_name") in ("__tensor__", "__numpy__"):
            inner = value.get("config") or {}
            return np.array(inner["value"], dtype=inner["dtype"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """Serialize like ``keras.optimizers.schedules.serialize``, exactly.

    Returns:
        ``{"module": "keras.optimizers.schedules", "class_name": ...,
        "config": ..., "registered_name": None}``. Config values are kept as
        they are (tuples stay tuples), except numpy values that are not Python
        scalar subclasses, which become ``{"class_name": "__tensor__", ...}``
        dicts as with Keras's numpy backend.

    Raises:
        ValueError: if ``schedule`` is not one of the supported schedules.
    """
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(
            "`schedule` must be a LearningRateSchedule. "
            f"Received: {schedule!r} of type {type(schedule).__name__}"
        )
    class_name = _keras_class_name(schedule)
    config = schedule.get_config()
    if not isinstance(config, dict):
        raise TypeError(f"get_config() of {schedule!r} should return a dict.")
    return {
        "module": KERAS_MODULE,
        "class_name": class_name,
        "config": _encode(config),
        "registered_name": None,
    }


def _build(
    cls: type[LearningRateSchedule], config: Mapping[str, Any]
) -> LearningRateSchedule:

    try:
        return cls.from_config(dict(config))
    except TypeError as exc:
        raise TypeError(
            f"Invalid config for learning rate schedule {cls.__name__}: "
            f"{exc}. "
            f"Config: {dict(config)!r}"
        ) from exc


def deserialize(config: Mapping[str, Any]) -> LearningRateSchedule:
    """Build a schedule from a serialized dict.

    Accepts the output of :func:`serialize` /
    ``keras.optimizers.schedules.serialize`` (``"module"`` and
    ``"registered_name"`` are ignored, as Keras ignores them for built-in
    schedules), as well as the legacy ``{"class_name": ..., "config": ...}``
    form. ``__tensor__`` / ``__numpy__`` encoded values inside the config are
    decoded back into numpy values.

    Raises:
        TypeError: if ``config`` is not a mapping, or its ``config`` entry
            does not match the schedule's constructor.
        ValueError: if ``class_name`` is missing or not a supported schedule,
            or the constructor rejects the arguments.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            "A serialized learning rate schedule must be a dict. "
            f"Received: {config!r} of type {type(config).__name__}"
        )
    if "class_name" not in config:
        raise ValueError(
            f"A serialized learning rate schedule needs a 'class_name' key. "
            f"Received: {dict(config)!r}"
        )
    class_name = config["class_name"]
    cls = None
    if isinstance(class_name, str):
        cls = SUPPORTED_SCHEDULES.get(class_name)
    if cls is None:
        raise _unknown_schedule(class_name)
    inner = config.get("config")
    if not isinstance(inner, Mapping):
        raise TypeError(
            f"The 'config' of a serialized {class_name} must be a dict. "
            f"Received: {inner!r}"
        )
    return _build(cls, _decode(dict(inner)))


def from_keras_object(obj: Any) -> LearningRateSchedule:
    """Convert a live Keras schedule object into the equivalent schedule here.

    Duck typed (Keras is not imported): the class is chosen by
    ``type(obj).__name__`` and built from ``obj.get_config()``.

    Raises:
        ValueError: if the class name is not a supported schedule.
        TypeError: if ``obj`` has no usable ``get_config()``.
    """
    class_name = type(obj).__name__
    cls = SUPPORTED_SCHEDULES.get(class_name)
    if cls is None:
        raise _unknown_schedule(class_name)
    get_config = getattr(obj, "get_config", None)
    if not callable(get_config):
        raise TypeError(f"{class_name} object has no callable get_config().")
    config = get_config()
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{class_name}.get_config() should return a dict. "
            f"Received: {config!r}"
        )
    return _build(cls, config)
