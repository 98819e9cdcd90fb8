"""The readable reference backend: Keras's operations, one variable at a time, in NumPy.

Each statement below is the NumPy operation that Keras's numpy backend performs for the same
line of ``BaseOptimizer`` / ``Adamax.update_step``, on a per-variable view of the flat buffers.
It allocates full-size temporaries freely; it exists to be obviously right. The fused CPU and
GPU backends are tested against it, and it is tested against real Keras.
"""

from __future__ import annotations

import numpy as np

from adamax_server.optim.kernels.base import ACC_ONLY, ACC_UPDATE, CLIP_GLOBAL, CLIP_NORM, CLIP_VALUE, FlatGroup, GroupStep


class ReferenceBackend:
    name = "reference"
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

    @staticmethod
    def _segments(group: FlatGroup):
        for s, (off, n) in enumerate(zip(group.table.offsets.tolist(), group.table.sizes.tolist())):
            yield s, slice(off, off + n)

    @staticmethod
    def _transformed_gradient(group: FlatGroup, step: GroupStep, sl: slice) -> np.ndarray:
        g = group.buffers["g"][sl]
        if step.use_loss_scale:
            g = g / step.loss_scale
        if step.acc_mode == ACC_UPDATE:
            g = (g + group.buffers["acc"][sl]) / step.acc_steps
        return g

    def sumsq(self, group: FlatGroup, step: GroupStep) -> np.ndarray:
        out = np.zeros(len(group.table.sizes), dtype=group.dtype)
        for s, sl in self._segments(group):
            if step.has_grad[s]:
                g = self._transformed_gradient(group, step, sl)
                out[s] = np.sum(np.square(g))
        return out

    def step(self, group: FlatGroup, step: GroupStep) -> None:
        b = group.buffers
        for s, sl in self._segments(group):
            w = b["w"][sl]
            if step.has_grad[s]:
                if step.acc_mode == ACC_ONLY:
                    g = b["g"][sl]
                    if step.use_loss_scale:
                        g = g / step.loss_scale
                    b["acc"][sl] = g + b["acc"][sl]
                else:
                    g = self._transformed_gradient(group, step, sl)
                    if step.clip_mode == CLIP_VALUE:
                        g = np.clip(g, -step.clip_value, step.clip_value).astype(group.dtype)
                    elif step.clip_mode == CLIP_NORM:
                        g = (g * step.clip_norm) / step.clip_denom[s]
                    elif step.clip_mode == CLIP_GLOBAL:
                        if step.global_scale_wide:
                            g = (g.astype(np.float64) * step.global_scale).astype(group.dtype)
                        else:
                            g = g * step.global_scale
                    if step.use_wd and step.decay[s]:
                        w[...] = w - w * step.wd * step.wd_lr
                    m = b["m"][sl]
                    u = b["u"][sl]
                    m[...] = m + (g - m) * step.one_minus_beta_1
                    u[...] = np.maximum(step.beta_2 * u, np.abs(g))
                    w[...] = w - (step.lr * m) / (
                        step.one_minus_beta_1_power * (u + step.epsilon)
                    )
            if step.acc_mode == ACC_UPDATE:
                b["acc"][sl] = 0
            if step.use_ema:
                avg = b["avg"][sl]
                avg[...] = step.ema_m * avg + step.ema_one_minus_m * w
                if step.overwrite:
                    w[...] = avg
