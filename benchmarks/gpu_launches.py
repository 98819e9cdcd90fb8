"""Three ``apply_staged`` steps on the GPU inside an NVTX range named "steps", for Nsight Compute.

``benchmarks/gpu_launch_count.sh`` runs it under ``ncu`` and counts the kernels launched, to show
that one step is one launch whatever the number of variables.

Usage: ``python benchmarks/gpu_launches.py NUM_VARIABLES [ema]``
"""

from __future__ import annotations

import os
import sys

import cupy as cp
import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "server")]

from adamax_server import Adamax  # noqa: E402

nvars = int(sys.argv[1])
total = 10_000_000
kw = {"use_ema": True, "gradient_accumulation_steps": 2} if len(sys.argv) > 2 else {}
opt = Adamax(device="gpu", **kw)
opt.build({f"v{i}": np.zeros(total // nvars, np.float32) for i in range(nvars)})
for i in range(nvars):
    opt.gradient_buffer(f"v{i}")[...] = 1.0
opt.apply_staged()
cp.cuda.Device().synchronize()
cp.cuda.nvtx.RangePush("steps")
for _ in range(3):
    opt.apply_staged()
cp.cuda.Device().synchronize()
cp.cuda.nvtx.RangePop()
print("done", nvars)
