"""Fused CPU backends over flat buffers: numba (parallel, releases the GIL) and blocked NumPy.

Both compute exactly what ``reference.ReferenceBackend`` computes, bit for bit: the same float
operations in the same order, in the group dtype, with no fast-math (no reassociation, no fused
multiply-add). NaN handling follows ``np.maximum`` / ``np.clip``: a NaN operand wins.

* ``NumbaBackend``: one parallel pass over all variables of a dtype group per ``apply``
  (tasks of up to 64K elements inside segments, ``prange`` over tasks), reading g, m, u, w and
  writing m, u, w once. ``nogil=True`` lets the service receive the next gradients while a step
  runs.
* ``BlockedNumpyBackend``: the fallback when numba is not installed; the same passes in blocks of
  64K elements with preallocated scratch, so no full-size temporary is created per operation.
"""

from __future__ import annotations

import numpy as np

from adamax_server.optim.kernels.base import (
    ACC_ONLY,
    ACC_UPDATE,
    CLIP_GLOBAL,
    CLIP_NORM,
    CLIP_VALUE,
    FlatGroup,
    GroupStep,
    SegmentTable,
)
from adamax_server.optim.kernels.parallel_gate import parallel_call

try:  # numba is a hard dependency of the package, but keep the module importable without it.
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False


# 16K elements: the slices of w, m, u, g, acc and avg that one task touches fit in L2 together.
CPU_TASK_ELEMENTS = 1 << 14


def _dummy(dtype: np.dtype) -> np.ndarray:
    return np.zeros(1, dtype=dtype)


class _HostBackendBase:
    xp = np

    def zeros(self, n: int, dtype: np.dtype) -> np.ndarray:
        return np.zeros(n, dtype=dtype)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True)

    def read_into(self, array: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, array.reshape(out.shape))

    def write(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, np.asarray(src).reshape(dst.shape), casting="unsafe")

    def synchronize(self) -> None:
        pass

    def write_range(self, flat: np.ndarray, start: int, chunk: np.ndarray) -> None:
        np.copyto(flat[start : start + chunk.size], chunk, casting="unsafe")

    def finish_staging(self) -> None:
        pass


if HAVE_NUMBA:

    @njit(inline="always")
    def _clip(x, lo, hi):
        # np.clip == minimum(maximum(x, lo), hi), NaN-propagating.
        if x != x:
            return x
        if x < lo:
            x = lo
        if x > hi:
            x = hi
        return x

    @njit(inline="always")
    def _transform(g, acc, i, use_loss_scale, loss_scale, acc_mode, acc_steps):
        gi = g[i]
        if use_loss_scale:
            gi = gi / loss_scale
        if acc_mode == 2:
            gi = (gi + acc[i]) / acc_steps
        return gi

    @njit(parallel=True, nogil=True, cache=True)
    def _leaf_sums(g, acc, leaf_start, leaf_len, use_loss_scale, loss_scale, acc_mode, acc_steps):
        out = np.empty(leaf_start.shape[0], dtype=g.dtype)
        zero = g.dtype.type(0)
        for k in prange(leaf_start.shape[0]):
            a = leaf_start[k]
            n = leaf_len[k]
            if n < 8:
                res = zero
                for i in range(a, a + n):
                    x = _transform(g, acc, i, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    res += x * x
            else:
                x = _transform(g, acc, a, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r0 = x * x
                x = _transform(g, acc, a + 1, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r1 = x * x
                x = _transform(g, acc, a + 2, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r2 = x * x
                x = _transform(g, acc, a + 3, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r3 = x * x
                x = _transform(g, acc, a + 4, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r4 = x * x
                x = _transform(g, acc, a + 5, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r5 = x * x
                x = _transform(g, acc, a + 6, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r6 = x * x
                x = _transform(g, acc, a + 7, use_loss_scale, loss_scale, acc_mode, acc_steps)
                r7 = x * x
                i = a + 8
                stop = a + n - (n % 8)
                while i < stop:
                    x = _transform(g, acc, i, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r0 += x * x
                    x = _transform(g, acc, i + 1, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r1 += x * x
                    x = _transform(g, acc, i + 2, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r2 += x * x
                    x = _transform(g, acc, i + 3, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r3 += x * x
                    x = _transform(g, acc, i + 4, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r4 += x * x
                    x = _transform(g, acc, i + 5, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r5 += x * x
                    x = _transform(g, acc, i + 6, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r6 += x * x
                    x = _transform(g, acc, i + 7, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    r7 += x * x
                    i += 8
                res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
                while i < a + n:
                    x = _transform(g, acc, i, use_loss_scale, loss_scale, acc_mode, acc_steps)
                    res += x * x
                    i += 1
            out[k] = res
        return out

    @njit(nogil=True, cache=True)
    def _combine(leaf_sums, program, seg_prog_start, seg_prog_end, has_grad, out):
        stack = np.empty(128, dtype=leaf_sums.dtype)
        for s in range(seg_prog_start.shape[0]):
            if not has_grad[s]:
                continue
            top = 0
            for p in range(seg_prog_start[s], seg_prog_end[s]):
                op = program[p]
                if op >= 0:
                    stack[top] = leaf_sums[op]
                    top += 1
                else:
                    top -= 1
                    stack[top - 1] = stack[top - 1] + stack[top]
            if top == 1:
                out[s] = stack[0]

    @njit(inline="always", nogil=True)
    def _update_task(
        w, m, u, g, acc, avg, has_grad, decays, denom,
        use_loss_scale, loss_scale, acc_mode, acc_steps,
        clip_mode, clip_value, clip_norm, global_scale, global_scale_wide,
        wd, wd_lr, lr, one_minus_beta_1, beta_2, epsilon, one_minus_beta_1_power,
        use_ema, ema_m, ema_one_minus_m, overwrite,
    ):  # fmt: skip
        # One task: every array is the task's slice (indexed from 0, L2-sized), and each
        # option is its own branch-free loop so that LLVM vectorises every pass. The staged
        # gradient ``g`` is the engine's scratch buffer and is transformed in place.
        zero = w.dtype.type(0)
        n = w.shape[0]
        if has_grad:
            if use_loss_scale:
                for i in range(n):
                    g[i] = g[i] / loss_scale
            if acc_mode == 1:
                for i in range(n):
                    acc[i] = g[i] + acc[i]
            else:
                if acc_mode == 2:
                    for i in range(n):
                        g[i] = (g[i] + acc[i]) / acc_steps
                        acc[i] = zero
                if clip_mode == 1:
                    lo = -clip_value
                    for i in range(n):
                        x = g[i]
                        y = lo if x < lo else x
                        y = clip_value if y > clip_value else y
                        g[i] = x if x != x else y  # np.clip: NaN stays NaN
                elif clip_mode == 2:
                    for i in range(n):
                        g[i] = (g[i] * clip_norm) / denom
                elif clip_mode == 3:
                    if global_scale_wide:
                        for i in range(n):
                            g[i] = w.dtype.type(np.float64(g[i]) * global_scale)
                    else:
                        scale = w.dtype.type(global_scale)
                        for i in range(n):
                            g[i] = g[i] * scale
                if decays:
                    for i in range(n):
                        wi = w[i]
                        w[i] = wi - wi * wd * wd_lr
                for i in range(n):
                    gi = g[i]
                    mi = m[i]
                    mi = mi + (gi - mi) * one_minus_beta_1
                    x = beta_2 * u[i]
                    y = abs(gi)
                    ui = x if (x != x or x >= y) else y  # np.maximum: NaN wins
                    w[i] = w[i] - (lr * mi) / (one_minus_beta_1_power * (ui + epsilon))
                    m[i] = mi
                    u[i] = ui
        elif acc_mode == 2:
            for i in range(n):
                acc[i] = zero
        if use_ema:
            if overwrite:
                for i in range(n):
                    av = ema_m * avg[i] + ema_one_minus_m * w[i]
                    avg[i] = av
                    w[i] = av
            else:
                for i in range(n):
                    avg[i] = ema_m * avg[i] + ema_one_minus_m * w[i]

    @njit(parallel=True, nogil=True, cache=True)
    def _fused_step(
        w, m, u, g, acc, avg,
        task_seg, task_start, task_end, has_grad, decay, clip_denom,
        use_loss_scale, loss_scale, acc_mode, acc_steps,
        clip_mode, clip_value, clip_norm, global_scale, global_scale_wide,
        use_wd, wd, wd_lr,
        lr, one_minus_beta_1, beta_2, epsilon, one_minus_beta_1_power,
        use_ema, ema_m, ema_one_minus_m, overwrite,
    ):  # fmt: skip
        has_acc = acc.shape[0] == w.shape[0]
        has_avg = avg.shape[0] == w.shape[0]
        for t in prange(task_seg.shape[0]):
            s = task_seg[t]
            a = task_start[t]
            b = task_end[t]
            acc_t = acc[a:b] if has_acc else acc
            avg_t = avg[a:b] if has_avg else avg
            _update_task(
                w[a:b], m[a:b], u[a:b], g[a:b], acc_t, avg_t,
                has_grad[s] != 0, use_wd and decay[s] != 0, clip_denom[s],
                use_loss_scale, loss_scale, acc_mode, acc_steps,
                clip_mode, clip_value, clip_norm, global_scale, global_scale_wide,
                wd, wd_lr, lr, one_minus_beta_1, beta_2, epsilon, one_minus_beta_1_power,
                use_ema, ema_m, ema_one_minus_m, overwrite,
            )  # fmt: skip


class NumbaBackend(_HostBackendBase):
    """Fused, parallel, GIL-free CPU kernels (numba)."""

    name = "numba"
    task_elements = CPU_TASK_ELEMENTS

    def __init__(self) -> None:
        if not HAVE_NUMBA:
            raise RuntimeError("numba is not installed; use the 'numpy' CPU backend")

    @staticmethod
    def _aux(group: FlatGroup, step: GroupStep):
        dummy = group.cache.get("dummy")
        if dummy is None:
            dummy = group.cache["dummy"] = _dummy(group.dtype)
        acc = group.buffers.get("acc", dummy)
        avg = group.buffers.get("avg", dummy)
        return acc, avg

    def sumsq(self, group: FlatGroup, step: GroupStep) -> np.ndarray:
        plan = group.table.pairwise_plan()
        acc, _ = self._aux(group, step)
        dt = group.dtype.type
        acc_mode = step.acc_mode if step.acc_mode == ACC_UPDATE else 0
        leaf = parallel_call(
            _leaf_sums, group.buffers["g"], acc, plan.leaf_start, plan.leaf_len,
            bool(step.use_loss_scale), dt(step.loss_scale), acc_mode, dt(step.acc_steps),
        )  # fmt: skip
        out = np.zeros(len(group.table.sizes), dtype=group.dtype)
        _combine(leaf, plan.program, plan.seg_prog_start, plan.seg_prog_end, step.has_grad, out)
        return out

    def step(self, group: FlatGroup, step: GroupStep) -> None:
        dt = group.dtype.type
        acc, avg = self._aux(group, step)
        t = group.cache.get("cpu_tasks")
        if t is None:
            t = group.cache["cpu_tasks"] = SegmentTable.build(
                group.table.sizes.tolist(), self.task_elements, group.table.offsets.tolist()
            )
        denom = step.clip_denom
        if denom is None:
            denom = group.cache.get("zero_denom")
            if denom is None or denom.shape[0] != len(t.sizes):
                denom = group.cache["zero_denom"] = np.zeros(len(t.sizes), dtype=group.dtype)
        parallel_call(
            _fused_step, group.buffers["w"], group.buffers["m"], group.buffers["u"], group.buffers["g"], acc, avg,
            t.task_seg, t.task_start, t.task_end, step.has_grad, step.decay, denom,
            bool(step.use_loss_scale), dt(step.loss_scale), int(step.acc_mode), dt(step.acc_steps),
            int(step.clip_mode), dt(step.clip_value), dt(step.clip_norm),
            np.float64(step.global_scale), bool(step.global_scale_wide),
            bool(step.use_wd), dt(step.wd), dt(step.wd_lr),
            dt(step.lr), dt(step.one_minus_beta_1), dt(step.beta_2), dt(step.epsilon),
            dt(step.one_minus_beta_1_power),
            bool(step.use_ema), dt(step.ema_m), dt(step.ema_one_minus_m), bool(step.overwrite),
        )  # fmt: skip


class BlockedNumpyBackend(_HostBackendBase):
    """Blocked NumPy passes with reused scratch: the fallback when numba is absent."""

    name = "numpy"
    block = 1 << 16

    def _scratch(self, group: FlatGroup, k: int) -> list[np.ndarray]:
        bufs = group.cache.get("scratch")
        if bufs is None:
            bufs = group.cache["scratch"] = [
                np.empty(self.block, dtype=group.dtype) for _ in range(4)
            ]
        return bufs

    def _gradient_block(self, group, step, a, b, out):
        n = b - a
        gv = out[:n]
        np.copyto(gv, group.buffers["g"][a:b])
        if step.use_loss_scale:
            np.divide(gv, step.loss_scale, out=gv)
        if step.acc_mode == ACC_UPDATE:
            np.add(gv, group.buffers["acc"][a:b], out=gv)
            np.divide(gv, step.acc_steps, out=gv)
        return gv

    def sumsq(self, group: FlatGroup, step: GroupStep) -> np.ndarray:
        plan = group.table.pairwise_plan()
        scratch = self._scratch(group, 1)[0]
        leaf = np.empty(plan.leaf_start.shape[0], dtype=group.dtype)
        # Leaves are at most 128 elements; evaluate them a block of leaves at a time.
        for k, (a, n) in enumerate(zip(plan.leaf_start.tolist(), plan.leaf_len.tolist())):
            gv = self._gradient_block(group, step, a, a + n, scratch)
            np.square(gv, out=gv)
            leaf[k] = np.sum(gv)
        out = np.zeros(len(group.table.sizes), dtype=group.dtype)
        for s in range(len(group.table.sizes)):
            if not step.has_grad[s]:
                continue
            stack: list = []
            for op in plan.program[plan.seg_prog_start[s] : plan.seg_prog_end[s]].tolist():
                if op >= 0:
                    stack.append(leaf[op])
                else:
                    right = stack.pop()
                    stack[-1] = stack[-1] + right
            out[s] = stack[0] if stack else 0  # a 0-element variable sums to 0
        return out

    def step(self, group: FlatGroup, step: GroupStep) -> None:
        buf = group.buffers
        g_s, t1, t2, t3 = self._scratch(group, 4)
        t = group.table
        for seg, a, b in zip(t.task_seg.tolist(), t.task_start.tolist(), t.task_end.tolist()):
            n = b - a
            w = buf["w"][a:b]
            x1, x2, x3 = t1[:n], t2[:n], t3[:n]
            if step.has_grad[seg]:
                if step.acc_mode == ACC_ONLY:
                    gv = g_s[:n]
                    np.copyto(gv, buf["g"][a:b])
                    if step.use_loss_scale:
                        np.divide(gv, step.loss_scale, out=gv)
                    np.add(gv, buf["acc"][a:b], out=buf["acc"][a:b])
                else:
                    gv = self._gradient_block(group, step, a, b, g_s)
                    if step.acc_mode == ACC_UPDATE:
                        buf["acc"][a:b] = 0
                    if step.clip_mode == CLIP_VALUE:
                        np.clip(gv, -step.clip_value, step.clip_value, out=gv)
                    elif step.clip_mode == CLIP_NORM:
                        np.multiply(gv, step.clip_norm, out=gv)
                        np.divide(gv, step.clip_denom[seg], out=gv)
                    elif step.clip_mode == CLIP_GLOBAL:
                        if step.global_scale_wide:
                            gv[...] = (gv.astype(np.float64) * step.global_scale).astype(gv.dtype)
                        else:
                            np.multiply(gv, group.dtype.type(step.global_scale), out=gv)
                    if step.use_wd and step.decay[seg]:
                        np.multiply(w, step.wd, out=x1)
                        np.multiply(x1, step.wd_lr, out=x1)
                        np.subtract(w, x1, out=w)
                    m = buf["m"][a:b]
                    u = buf["u"][a:b]
                    np.subtract(gv, m, out=x1)
                    np.multiply(x1, step.one_minus_beta_1, out=x1)
                    np.add(m, x1, out=m)
                    np.multiply(u, step.beta_2, out=x1)
                    np.abs(gv, out=x2)
                    np.maximum(x1, x2, out=u)
                    np.multiply(m, step.lr, out=x1)
                    np.add(u, step.epsilon, out=x2)
                    np.multiply(x2, step.one_minus_beta_1_power, out=x2)
                    np.divide(x1, x2, out=x1)
                    np.subtract(w, x1, out=w)
            elif step.acc_mode == ACC_UPDATE:
                buf["acc"][a:b] = 0
            if step.use_ema:
                avg = buf["avg"][a:b]
                np.multiply(avg, step.ema_m, out=x1)
                np.multiply(w, step.ema_one_minus_m, out=x3)
                np.add(x1, x3, out=avg)
                if step.overwrite:
                    np.copyto(w, avg)


def numba_threads() -> int:
    return numba.get_num_threads() if HAVE_NUMBA else 1
