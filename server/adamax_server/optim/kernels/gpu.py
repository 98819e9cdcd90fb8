"""CuPy backend: the fused Adamax step as one CUDA kernel per dtype group.

Buffers live in GPU memory as flat CuPy arrays. A step launches one kernel for all variables of
a dtype group: blocks take tasks of ``GPU_TASK`` elements from a device-side task table (each
task inside one variable), so the launch count does not depend on the number of variables.
Per-variable data (has-gradient, weight-decay flag, clipnorm denominator) travels as small
per-segment arrays, cached on the device while unchanged.

Compiled with ``--fmad=false`` and IEEE division (no fast-math), so each float operation rounds
like NumPy's; the element-wise results equal the CPU backends. Sums of squares for clipnorm /
global_clipnorm are accumulated per task in float64 and added per segment on the host, which
can differ from NumPy's float32 pairwise sum in the last bits of the norm.
"""

from __future__ import annotations

import os
from string import Template
from typing import Any

import numpy as np

from adamax_server.optim.kernels.base import ACC_UPDATE, FlatGroup, GroupStep

try:
    import cupy as cp
except ImportError:  # pragma: no cover - only where CuPy is absent
    cp = None

# Elements per task (one block; a multiple of 16). 4096 measured best on an H100 (1e8-1e9 params).
GPU_TASK = int(os.environ.get("ADAMAX_PS_GPU_TASK", 4096))
MIN_BLOCKS = int(os.environ.get("ADAMAX_PS_GPU_MIN_BLOCKS", 4))  # __launch_bounds__ occupancy hint
# Blocks per SM of the grid-stride launch; 0 launches one block per task. On an H100 the
# sweep over 0/4/8/16 (1e7-1e9 params) found one block per task best, hence the default.
GRID_PER_SM = int(os.environ.get("ADAMAX_PS_GPU_GRID_PER_SM", 0))
PINNED_CHUNK_BYTES = 4 << 20  # staging chunk: the transport's chunk size, or a part of it
PINNED_SLOTS = 4  # ring of pinned buffers: copies of earlier chunks overlap receiving later ones
THREADS = 256

_SOURCE = Template(
    r"""
typedef ${T} T;

__device__ __forceinline__ T nan_max(T a, T b) {
    if (a != a) return a;
    if (b != b) return b;
    return a >= b ? a : b;
}

__device__ __forceinline__ T clip_value(T x, T lo, T hi) {
    if (x != x) return x;
    if (x < lo) x = lo;
    if (x > hi) x = hi;
    return x;
}

// VEC elements = 16 bytes: segments start on 16-element boundaries and tasks are multiples
// of 16 elements, so every task's vector part is 16-byte aligned.
#define VEC (16 / sizeof(T))
struct __align__(16) Vec { T v[16 / sizeof(T)]; };

struct StepArgs {
    int use_loss_scale; T loss_scale; int acc_mode; T acc_steps;
    int clip_mode; T clip_v; T clip_norm; double global_scale; int global_scale_wide;
    bool decays; T wd; T wd_lr;
    T lr; T one_minus_beta_1; T beta_2; T epsilon; T one_minus_beta_1_power;
    int use_ema; T ema_m; T ema_one_minus_m; int overwrite; T denom;
};

// One element, in the order of kernels/base.py (and Keras).
__device__ __forceinline__ void update_one(
    const StepArgs& p, bool grad, T& wi, T& mi, T& ui, T gi, T& acci, T& avgi)
{
    if (grad) {
        if (p.use_loss_scale) gi = gi / p.loss_scale;
        if (p.acc_mode == 1) {
            acci = gi + acci;
        } else {
            if (p.acc_mode == 2) { gi = (gi + acci) / p.acc_steps; acci = (T)0; }
            if (p.clip_mode == 1) gi = clip_value(gi, -p.clip_v, p.clip_v);
            else if (p.clip_mode == 2) gi = (gi * p.clip_norm) / p.denom;
            else if (p.clip_mode == 3) {
                if (p.global_scale_wide) gi = (T)((double)gi * p.global_scale);
                else gi = gi * (T)p.global_scale;
            }
            if (p.decays) wi = wi - wi * p.wd * p.wd_lr;
            mi = mi + (gi - mi) * p.one_minus_beta_1;
            ui = nan_max(p.beta_2 * ui, fabs(gi));
            wi = wi - (p.lr * mi) / (p.one_minus_beta_1_power * (ui + p.epsilon));
        }
    } else if (p.acc_mode == 2) {
        acci = (T)0;
    }
    if (p.use_ema) {
        T av = p.ema_m * avgi + p.ema_one_minus_m * wi;
        avgi = av;
        if (p.overwrite) wi = av;
    }
}

// FLAGS: bit 0 = the accumulator buffer is used this call, bit 1 = EMA. Each combination is
// its own instantiation, so the plain step does not pay registers for acc/avg vectors.
template <int FLAGS>
__global__ void __launch_bounds__(${THREADS}, ${MIN_BLOCKS}) adamax_step(
    T* __restrict__ w, T* __restrict__ m, T* __restrict__ u, const T* __restrict__ g,
    T* __restrict__ acc, T* __restrict__ avg,
    const int* __restrict__ task_seg, const long long* __restrict__ task_start,
    const int* __restrict__ task_len, const unsigned char* __restrict__ has_grad,
    const unsigned char* __restrict__ decay, const T* __restrict__ clip_denom,
    int use_loss_scale, T loss_scale, int acc_mode, T acc_steps,
    int clip_mode, T clip_v, T clip_norm, double global_scale, int global_scale_wide,
    int use_wd, T wd, T wd_lr,
    T lr, T one_minus_beta_1, T beta_2, T epsilon, T one_minus_beta_1_power,
    int use_ema, T ema_m, T ema_one_minus_m, int overwrite, int n_tasks)
{
  // Grid-stride over tasks: a grid sized to the GPU (GRID_PER_SM blocks per SM) walks every
  // task, so no partly filled last wave of blocks idles the GPU.
  for (int t = blockIdx.x; t < n_tasks; t += gridDim.x) {
    const int s = task_seg[t];
    const long long a = task_start[t];
    const int n = task_len[t];
    const bool grad = has_grad[s] != 0;
    StepArgs p = {use_loss_scale, loss_scale, acc_mode, acc_steps, clip_mode, clip_v, clip_norm,
                  global_scale, global_scale_wide, use_wd && decay[s] != 0, wd, wd_lr, lr,
                  one_minus_beta_1, beta_2, epsilon, one_minus_beta_1_power, use_ema, ema_m,
                  ema_one_minus_m, overwrite, clip_denom[s]};
    // What this call reads and writes: plain steps touch only w, m, u, g.
    const bool has_acc = (FLAGS & 1) != 0;
    const bool has_ema = (FLAGS & 2) != 0;
    p.use_ema = has_ema;
    if (!has_acc) p.acc_mode = 0;
    const bool touch_mug = grad && p.acc_mode != 1;
    const bool touch_g = grad;
    const bool touch_acc = has_acc && (grad || p.acc_mode == 2);
    const bool touch_w = touch_mug || has_ema;  // read
    const bool write_w = touch_mug || (has_ema && p.overwrite);  // written only if it changes
    if (!(touch_w || touch_acc)) continue;

    Vec* __restrict__ W = (Vec*)(w + a);
    Vec* __restrict__ M = (Vec*)(m + a);
    Vec* __restrict__ U = (Vec*)(u + a);
    const Vec* __restrict__ G = (const Vec*)(g + a);
    Vec* __restrict__ ACC = (Vec*)(acc + a);
    Vec* __restrict__ AVG = (Vec*)(avg + a);
    const int nvec = n / VEC;
    #pragma unroll 4
    for (int k = threadIdx.x; k < nvec; k += blockDim.x) {
        Vec wv, mv, uv, gv, accv, avgv;
        if (touch_w) wv = W[k];
        if (touch_mug) { mv = M[k]; uv = U[k]; }
        if (touch_g) gv = G[k];
        if (touch_acc) accv = ACC[k];
        if (has_ema) avgv = AVG[k];
        #pragma unroll
        for (int j = 0; j < (int)VEC; ++j)
            update_one(p, grad, wv.v[j], mv.v[j], uv.v[j], gv.v[j], accv.v[j], avgv.v[j]);
        if (write_w) W[k] = wv;
        if (touch_mug) { M[k] = mv; U[k] = uv; }
        if (touch_acc) ACC[k] = accv;
        if (has_ema) AVG[k] = avgv;
    }
    // The tail of the segment's last task (n not a multiple of VEC).
    for (long long i = a + (long long)nvec * VEC + threadIdx.x; i < a + n; i += blockDim.x) {
        T wi = w[i], mi = 0, ui = 0, gi = 0, acci = 0, avgi = 0;
        if (touch_mug) { mi = m[i]; ui = u[i]; }
        if (touch_g) gi = g[i];
        if (touch_acc) acci = acc[i];
        if (has_ema) avgi = avg[i];
        update_one(p, grad, wi, mi, ui, gi, acci, avgi);
        if (write_w) w[i] = wi;
        if (touch_mug) { m[i] = mi; u[i] = ui; }
        if (touch_acc) acc[i] = acci;
        if (has_ema) avg[i] = avgi;
    }
  }
}

extern "C" __global__ void sumsq_${T}(
    const T* __restrict__ g, const T* __restrict__ acc,
    const long long* __restrict__ task_start, const int* __restrict__ task_len,
    int use_loss_scale, T loss_scale, int acc_mode, T acc_steps, double* __restrict__ out)
{
    __shared__ double partial[${THREADS}];
    const int t = blockIdx.x;
    const long long a = task_start[t];
    const long long b = a + task_len[t];
    double sum = 0.0;
    for (long long i = a + threadIdx.x; i < b; i += blockDim.x) {
        T gi = g[i];
        if (use_loss_scale) gi = gi / loss_scale;
        if (acc_mode == 2) gi = (gi + acc[i]) / acc_steps;
        T sq = gi * gi;
        sum += (double)sq;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) partial[threadIdx.x] += partial[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[t] = partial[0];
}
"""
)

_CTYPE = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_modules: dict[np.dtype, Any] = {}


def _step_name(flags: int) -> str:
    return f"adamax_step<{flags}>"


def _module(dtype: np.dtype):
    mod = _modules.get(dtype)
    if mod is None:
        src = _SOURCE.substitute(T=_CTYPE[dtype], THREADS=THREADS, MIN_BLOCKS=MIN_BLOCKS)
        mod = cp.RawModule(
            code=src,
            # IEEE float32: no fused multiply-add, no flush of subnormals to zero, exact
            # division and square root; each operation rounds as NumPy's does.
            options=("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++14"),
            name_expressions=[_step_name(f) for f in range(4)],
        )
        _modules[dtype] = mod
    return mod


class CupyBackend:
    """Adamax state in GPU memory, updated by fused CUDA kernels."""

    name = "cupy"

    def __init__(self) -> None:
        if cp is None:
            raise RuntimeError("CuPy is not installed (pip install adamax-ps[gpu])")
        self.xp = cp
        self._copy_stream = None
        self._ring: list[tuple[np.ndarray, Any]] = []  # (pinned host buffer, its copy event)
        self._ring_next = 0
        self._pending = False

    # -------------------------------------------------------------- staging
    def _pinned_slot(self) -> tuple[np.ndarray, Any]:
        """The next pinned buffer of the ring, once its previous copy has finished."""
        if not self._ring:
            self._copy_stream = cp.cuda.Stream(non_blocking=True)
            for _ in range(PINNED_SLOTS):
                mem = cp.cuda.alloc_pinned_memory(PINNED_CHUNK_BYTES)
                host = np.frombuffer(mem, dtype=np.uint8, count=PINNED_CHUNK_BYTES)
                self._ring.append((host, None))
        host, event = self._ring[self._ring_next]
        if event is not None:
            event.synchronize()
        return host, self._ring_next

    def write_range(self, flat, start: int, chunk: np.ndarray) -> None:
        """Host chunk -> pinned buffer (casting) -> async copy on the copy stream."""
        itemsize = flat.dtype.itemsize
        per_slot = PINNED_CHUNK_BYTES // itemsize
        for a in range(0, chunk.size, per_slot):
            part = chunk[a : a + per_slot]
            host, slot = self._pinned_slot()
            staged = host[: part.size * itemsize].view(flat.dtype)
            np.copyto(staged, part, casting="unsafe")
            dst = flat[start + a : start + a + part.size]
            dst.set(staged, stream=self._copy_stream)
            event = cp.cuda.Event(disable_timing=True)
            event.record(self._copy_stream)
            self._ring[slot] = (host, event)
            self._ring_next = (slot + 1) % PINNED_SLOTS
            self._pending = True

    def write_device(self, dst, src, ready) -> None:
        """Stage from a device copy made while receiving (see ``kernels.base.DeviceStagedArray``).

        The host waits for that copy's event, so its pinned source buffer may be reused as soon
        as this returns; the cast to the variable dtype runs on the device.
        """
        if ready is not None:
            ready.synchronize()
        dst[...] = src.reshape(dst.shape).astype(dst.dtype, copy=False)

    def device_receiver(self) -> DeviceReceiver:
        return DeviceReceiver(self)

    def finish_staging(self) -> None:
        """The compute stream waits (on the device) for every staged copy."""
        if self._pending:
            done = cp.cuda.Event(disable_timing=True)
            done.record(self._copy_stream)
            cp.cuda.get_current_stream().wait_event(done)
            self._pending = False

    def zeros(self, n: int, dtype: np.dtype):
        return cp.zeros(n, dtype=dtype)

    def to_host(self, array) -> np.ndarray:
        return cp.asnumpy(array)

    def read_into(self, array, out: np.ndarray) -> None:
        # Through a temporary host copy, the transfer the GPU suite was last run with; copying
        # straight into ``out`` (cp.asnumpy(out=...)) saves a host pass but waits for a GPU run.
        np.copyto(out, cp.asnumpy(array).reshape(out.shape))

    def write(self, dst, src) -> None:
        if isinstance(src, cp.ndarray):
            dst[...] = src.reshape(dst.shape).astype(dst.dtype, copy=False)
            return
        # (np.ascontiguousarray would turn a 0-d scalar variable into shape (1,).)
        host = np.asarray(np.asarray(src).reshape(dst.shape), dtype=dst.dtype, order="C")
        dst.set(host)

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def prepare(self, group: FlatGroup) -> None:
        """Compile the kernels for this group's dtype and build its tables now (at ``build``).

        NVRTC takes a second or more the first time; doing it here keeps that out of the first
        push, which runs under a worker's deadline.
        """
        mod = _module(group.dtype)
        for flags in range(4):
            mod.get_function(_step_name(flags))
        mod.get_function(f"sumsq_{_CTYPE[group.dtype]}")
        self._tables(group)

    # -------------------------------------------------------------- device tables
    def _tables(self, group: FlatGroup) -> dict[str, Any]:
        tab = group.cache.get("gpu_tables")
        if tab is None:
            seg, start, end = [], [], []
            for s, (off, n) in enumerate(
                zip(group.table.offsets.tolist(), group.table.sizes.tolist())
            ):
                starts = np.arange(off, off + n, GPU_TASK, dtype=np.int64)
                seg.append(np.full(starts.shape, s, dtype=np.int64))
                start.append(starts)
                end.append(np.minimum(starts + GPU_TASK, off + n))
            cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
            host_seg, host_start, host_end = cat(seg), cat(start), cat(end)
            tab = {
                "n_tasks": int(host_seg.shape[0]),
                "seg_host": host_seg,
                "seg": cp.asarray(host_seg.astype(np.int32)),
                "start": cp.asarray(host_start),
                "len": cp.asarray((host_end - host_start).astype(np.int32)),
                "dummy": cp.zeros(16, dtype=group.dtype),
                "small": {},
            }
            group.cache["gpu_tables"] = tab
        return tab

    @staticmethod
    def _small(tab: dict[str, Any], key: str, host: np.ndarray):
        """A small per-segment array on the device, re-uploaded only when it changes."""
        cached = tab["small"].get(key)
        raw = host.tobytes()
        if cached is None or cached[0] != raw:
            cached = (raw, cp.asarray(host))
            tab["small"][key] = cached
        return cached[1]

    # -------------------------------------------------------------- passes
    def sumsq(self, group: FlatGroup, step: GroupStep) -> np.ndarray:
        tab = self._tables(group)
        dt = group.dtype.type
        out = cp.empty(max(tab["n_tasks"], 1), dtype=cp.float64)
        if tab["n_tasks"]:
            _module(group.dtype).get_function(f"sumsq_{_CTYPE[group.dtype]}")(
                (tab["n_tasks"],), (THREADS,),
                (
                    group.buffers["g"], group.buffers.get("acc", tab["dummy"]),
                    tab["start"], tab["len"],
                    np.int32(step.use_loss_scale), dt(step.loss_scale),
                    np.int32(ACC_UPDATE if step.acc_mode == ACC_UPDATE else 0), dt(step.acc_steps),
                    out,
                ),
            )  # fmt: skip
        partial = cp.asnumpy(out)[: tab["n_tasks"]]
        sums = np.zeros(len(group.table.sizes), dtype=np.float64)
        np.add.at(sums, tab["seg_host"], partial)
        sums[step.has_grad == 0] = 0
        return sums.astype(group.dtype)

    def step(self, group: FlatGroup, step: GroupStep) -> None:
        tab = self._tables(group)
        if not tab["n_tasks"]:
            return
        dt = group.dtype.type
        nseg = len(group.table.sizes)
        denom_host = (
            step.clip_denom.astype(group.dtype)
            if step.clip_denom is not None
            else np.zeros(nseg, dtype=group.dtype)
        )
        dummy = tab["dummy"]
        flags = (1 if (step.acc_mode != 0 and "acc" in group.buffers) else 0) | (
            2 if step.use_ema else 0
        )
        _module(group.dtype).get_function(_step_name(flags))(
            (self._grid(tab["n_tasks"]),), (THREADS,),
            (
                group.buffers["w"], group.buffers["m"], group.buffers["u"], group.buffers["g"],
                group.buffers.get("acc", dummy), group.buffers.get("avg", dummy),
                tab["seg"], tab["start"], tab["len"],
                self._small(tab, "has_grad", np.ascontiguousarray(step.has_grad, np.uint8)),
                self._small(tab, "decay", np.ascontiguousarray(step.decay, np.uint8)),
                self._small(tab, "denom", denom_host),
                np.int32(step.use_loss_scale), dt(step.loss_scale),
                np.int32(step.acc_mode), dt(step.acc_steps),
                np.int32(step.clip_mode), dt(step.clip_value), dt(step.clip_norm),
                np.float64(step.global_scale), np.int32(step.global_scale_wide),
                np.int32(step.use_wd), dt(step.wd), dt(step.wd_lr),
                dt(step.lr), dt(step.one_minus_beta_1), dt(step.beta_2), dt(step.epsilon),
                dt(step.one_minus_beta_1_power),
                np.int32(step.use_ema), dt(step.ema_m), dt(step.ema_one_minus_m),
                np.int32(step.overwrite), np.int32(tab["n_tasks"]),
            ),
        )  # fmt: skip

    def _grid(self, n_tasks: int) -> int:
        """Blocks to launch: one per task, or a GPU-sized grid that strides over the tasks."""
        if GRID_PER_SM <= 0:
            return n_tasks
        sms = getattr(self, "_sm_count", None)
        if sms is None:
            sms = self._sm_count = cp.cuda.Device().attributes["MultiProcessorCount"]
        return max(1, min(n_tasks, sms * GRID_PER_SM))


class DeviceReceiver:
    """Receive buffers for one push: pinned host memory, copied to the GPU chunk by chunk.

    ``allocate`` is the wire decoder's hook (``_wire.decode_stream(allocate=...)``). For a dense
    float32/float16/float64 tensor it returns a pinned receive buffer and a callback that issues
    an asynchronous host-to-device copy of every filled byte range on the backend's copy stream,
    so the transfer runs while later chunks are still arriving. ``wrap(name, host)`` then returns
    the host array as a ``DeviceStagedArray`` carrying its device copy.
    """

    _DENSE_FLOAT_WIRE = {1: np.float32, 2: np.float16, 4: np.float64}  # adamax.v1 DType codes

    def __init__(self, backend: CupyBackend) -> None:
        self._backend = backend
        self._mirrors: dict[str, tuple[Any, Any, Any]] = {}  # name -> (pinned mem, device, event)

    def allocate(self, header: Any, nbytes: int):
        if header.layout not in (0, 1) or header.dtype not in self._DENSE_FLOAT_WIRE or nbytes == 0:
            return None
        be = self._backend
        if be._copy_stream is None:
            be._pinned_slot()  # creates the copy stream (and the staging ring)
        stream = be._copy_stream
        # Device memory freed by an earlier push may still be read by work queued on the compute
        # stream: the copy stream starts writing only after that work.
        stream.wait_event(cp.cuda.get_current_stream().record())
        mem = cp.cuda.alloc_pinned_memory(nbytes)
        host = np.frombuffer(mem, dtype=np.uint8, count=nbytes)
        device = cp.empty(nbytes, dtype=cp.uint8)
        event = cp.cuda.Event(disable_timing=True)
        self._mirrors[header.name] = (mem, device, event)

        def filled(start: int, end: int) -> None:
            device[start:end].set(host[start:end], stream=stream)
            event.record(stream)

        return host, filled

    def wait(self) -> None:
        """Block until every copy this receiver started has finished.

        Called when the stream ends, decoded or not: only the last chunk's copy can still be
        running then, and afterwards the pinned and device buffers are safe to release (a
        rejected push drops them without ever applying them).
        """
        for _, _, event in self._mirrors.values():
            event.synchronize()

    def wrap(self, name: str, host: np.ndarray) -> Any:
        mirror = self._mirrors.get(name)
        if mirror is None or not isinstance(host, np.ndarray):
            return host
        from adamax_server.optim.kernels.base import DeviceStagedArray

        _, device, event = mirror
        typed = device.view(host.dtype).reshape(host.shape)
        return DeviceStagedArray.wrap(host, typed, event)
