"""What every array backend receives for one ``apply`` call, and the contract it implements.

The engine (``adamax_server.optim.engine``) does the Keras orchestration on the host: it decides which
variables have a gradient, whether this call is a real update or only accumulates, and computes
every scalar (learning rate, ``1 - beta_1 ** t``, EMA momentum, clip scale) with exactly the
NumPy operations Keras's numpy backend uses. A backend then does the array work over flat
buffers, one dtype group at a time, through two calls:

* ``sumsq(group, step)``: per-segment sum of squares of the transformed gradient (for clipnorm
  and global_clipnorm), summed in NumPy's pairwise order so that the result is the one
  ``np.sum(np.square(g))`` gives.
* ``step(group, step)``: the fused update of every segment of the group.

Per element ``i`` of a segment ``s`` with a gradient, ``step`` computes, in the group dtype and in
this order (the order of Keras's ``BaseOptimizer.apply`` and ``Adamax.update_step``)::

    g = g / loss_scale                               # if loss_scale_factor
    acc = g + acc; (stop here)                       # accumulation, not an update step
    g = (g + acc) / steps; acc = 0                   # accumulation, update step
    g = clip(g, -v, v) | (g * c) / denom[s] | g * s  # clipvalue | clipnorm | global_clipnorm
    w = w - w * wd * lr                              # weight decay, if decay[s]
    m = m + (g - m) * (1 - beta_1)
    u = maximum(beta_2 * u, abs(g))
    w = w - (lr * m) / ((1 - beta_1 ** t) * (u + epsilon))

and then, for every segment (with a gradient or not)::

    acc = 0                                          # accumulation, update step
    avg = ema_m * avg + (1 - ema_m) * w              # use_ema
    w = avg                                          # use_ema and this is an overwrite step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Element-wise passes are split into tasks of at most this many elements, inside one segment.
TASK_ELEMENTS = 1 << 16

# Segment start alignment in elements.
SEGMENT_ALIGN = 16

# NumPy's pairwise summation: blocks of at most 128 elements, 8 partial sums inside a block.
PAIRWISE_BLOCK = 128

ACC_NONE = 0  # no gradient accumulation configured
ACC_ONLY = 1  # accumulation step: acc += g, no update
ACC_UPDATE = 2  # accumulation configured and this call is an update step

CLIP_NONE = 0
CLIP_VALUE = 1
CLIP_NORM = 2
CLIP_GLOBAL = 3


@dataclass
class SegmentTable:
    """Where each variable of a dtype group lives in the group's flat buffers."""

    offsets: np.ndarray  # int64, start of each segment in the flat buffers
    sizes: np.ndarray  # int64, number of elements of each segment
    task_seg: np.ndarray  # int64, segment of each element-wise task
    task_start: np.ndarray  # int64, first element (flat index) of each task
    task_end: np.ndarray  # int64, one past the last element of each task
    # Pairwise-summation plan, built on first use (only clipnorm/global_clipnorm need it).
    pairwise: PairwisePlan | None = None

    @classmethod
    def build(
        cls, sizes: list[int], task_elements: int = TASK_ELEMENTS, offsets: list[int] | None = None
    ) -> SegmentTable:
        sizes_arr = np.asarray(sizes, dtype=np.int64)
        if offsets is None:
            # Each segment starts on a SEGMENT_ALIGN-element boundary (64 bytes for float32), so
            # kernels can use aligned vector loads; the padding between segments is never read.
            padded = -(-sizes_arr // SEGMENT_ALIGN) * SEGMENT_ALIGN
            offsets_arr = np.zeros(len(sizes), dtype=np.int64)
            if len(sizes) > 1:
                offsets_arr[1:] = np.cumsum(padded)[:-1]
        else:
            offsets_arr = np.asarray(offsets, dtype=np.int64)
        offsets = offsets_arr
        seg, start, end = [], [], []
        for s, (off, n) in enumerate(zip(offsets.tolist(), sizes_arr.tolist())):
            for a in range(0, n, task_elements):
                seg.append(s)
                start.append(off + a)
                end.append(off + min(n, a + task_elements))
        return cls(
            offsets=offsets,
            sizes=sizes_arr,
            task_seg=np.asarray(seg, dtype=np.int64),
            task_start=np.asarray(start, dtype=np.int64),
            task_end=np.asarray(end, dtype=np.int64),
        )

    @property
    def total(self) -> int:
        """Elements the flat buffers need (the last segment's end)."""
        if len(self.sizes) == 0:
            return 0
        return int(self.offsets[-1] + self.sizes[-1])

    def pairwise_plan(self) -> PairwisePlan:
        if self.pairwise is None:
            self.pairwise = PairwisePlan.build(self.offsets.tolist(), self.sizes.tolist())
        return self.pairwise


@dataclass
class PairwisePlan:
    """NumPy's pairwise summation tree for every segment, flattened for a kernel.

    ``np.sum`` over a contiguous float array splits a range of ``n > 128`` elements at
    ``n2 = n // 2 - (n // 2) % 8`` and adds the two halves' sums; ranges of 8..128 elements use
    eight running sums combined as ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))`` and
    then the tail; ranges under 8 add left to right from zero. The leaves are the ranges of at
    most 128 elements; ``program`` evaluates the tree in postfix order: ``k >= 0`` pushes the
    sum of leaf ``k``, ``-1`` pops two sums and pushes their sum.
    """

    leaf_start: np.ndarray  # int64 flat index
    leaf_len: np.ndarray  # int64
    program: np.ndarray  # int64 postfix program over all segments
    seg_prog_start: np.ndarray  # int64, each segment's slice of ``program``
    seg_prog_end: np.ndarray

    @classmethod
    def build(cls, offsets: list[int], sizes: list[int]) -> PairwisePlan:
        leaf_start: list[int] = []
        leaf_len: list[int] = []
        program: list[int] = []
        seg_prog_start, seg_prog_end = [], []

        for off, n in zip(offsets, sizes):
            seg_prog_start.append(len(program))
            if n == 0:
                seg_prog_end.append(len(program))
                continue
            # Iterative post-order traversal of the split tree.
            stack: list[tuple[int, int, bool]] = [(off, n, False)]
            while stack:
                a, k, expanded = stack.pop()
                if k <= PAIRWISE_BLOCK:
                    program.append(len(leaf_start))
                    leaf_start.append(a)
                    leaf_len.append(k)
                elif expanded:
                    program.append(-1)
                else:
                    n2 = k // 2
                    n2 -= n2 % 8
                    stack.append((a, k, True))
                    stack.append((a + n2, k - n2, False))
                    stack.append((a, n2, False))
            seg_prog_end.append(len(program))

        return cls(
            leaf_start=np.asarray(leaf_start, dtype=np.int64),
            leaf_len=np.asarray(leaf_len, dtype=np.int64),
            program=np.asarray(program, dtype=np.int64),
            seg_prog_start=np.asarray(seg_prog_start, dtype=np.int64),
            seg_prog_end=np.asarray(seg_prog_end, dtype=np.int64),
        )


@dataclass
class FlatGroup:
    """All variables of one dtype: one flat buffer per slot, and per-variable segments.

    ``buffers`` maps a slot name ("w", "m", "u", "avg", "acc", "g") to a flat backend array.
    ``avg`` exists only with EMA and ``acc`` only with gradient accumulation.
    """

    dtype: np.dtype
    table: SegmentTable
    buffers: dict[str, Any]
    size: int
    # Backend-private data (device copies of the tables, scratch space, ...).
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupStep:
    """The per-call parameters of one dtype group. Float scalars are already in the group dtype."""

    has_grad: np.ndarray  # uint8 per segment
    decay: np.ndarray  # uint8 per segment: weight decay applies (only meaningful if use_wd)
    acc_mode: int
    acc_steps: Any
    use_loss_scale: bool
    loss_scale: Any
    clip_mode: int
    clip_value: Any
    clip_norm: Any
    clip_denom: np.ndarray | None  # per segment, for CLIP_NORM; filled in between sumsq and step
    global_scale: Any  # for CLIP_GLOBAL
    global_scale_wide: bool  # the scale is float64 while the group is float32 (mixed dtypes)
    use_wd: bool
    wd: Any
    wd_lr: Any
    lr: Any
    one_minus_beta_1: Any
    beta_2: Any
    epsilon: Any
    one_minus_beta_1_power: Any
    use_ema: bool
    ema_m: Any
    ema_one_minus_m: Any
    overwrite: bool

    @property
    def updates(self) -> bool:
        return self.acc_mode != ACC_ONLY


class Backend(Protocol):
    """An array backend: where buffers live and how the fused passes run."""

    name: str
    xp: Any  # numpy or cupy

    def zeros(self, n: int, dtype: np.dtype) -> Any: ...

    def to_host(self, array: Any) -> np.ndarray: ...

    def read_into(self, array: Any, out: np.ndarray) -> None:
        """Copy a backend array into the host array ``out`` (same shape and dtype)."""
        ...

    def write(self, dst: Any, src: np.ndarray) -> None:
        """Copy a host array into a backend array of the same size (casting to dst's dtype)."""
        ...

    def write_range(self, flat: Any, start: int, chunk: np.ndarray) -> None:
        """Copy a host chunk into ``flat[start:start + len(chunk)]`` (may be asynchronous)."""
        ...

    def finish_staging(self) -> None:
        """Make every ``write_range`` visible to the next ``step``."""
        ...

    def sumsq(self, group: FlatGroup, step: GroupStep) -> np.ndarray:
        """Per-segment sum of squares of the transformed gradient (0 where no gradient)."""
        ...

    def step(self, group: FlatGroup, step: GroupStep) -> None: ...

    def synchronize(self) -> None: ...


class DeviceStagedArray(np.ndarray):
    """A host gradient whose bytes were also copied to the engine's GPU while they arrived.

    It behaves as the host array (validation and metrics read it); ``device_copy`` holds the same
    elements on the device (in the wire dtype, same shape) and ``ready`` is the CUDA event after
    which that copy is complete. The engine stages from ``device_copy``, so the host-to-device
    transfer overlapped the network receive instead of following it.
    """

    device_copy: Any = None
    ready: Any = None

    @classmethod
    def wrap(cls, host: np.ndarray, device_copy: Any, ready: Any) -> DeviceStagedArray:
        out = host.view(cls)
        out.device_copy = device_copy
        out.ready = ready
        return out
