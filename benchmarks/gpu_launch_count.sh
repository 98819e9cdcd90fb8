#!/bin/bash
# Kernels launched by 3 GPU steps, for 10 and 1000 variables, plain and with EMA + accumulation.
# Needs Nsight Compute (ncu) and CuPy. Usage: bash benchmarks/gpu_launch_count.sh
cd "$(dirname "$0")/.."
for args in "10" "1000" "10 ema" "1000 ema"; do
  ncu --nvtx --nvtx-include "steps/" --metrics gpu__time_duration.sum \
      python3 benchmarks/gpu_launches.py $args > /tmp/ncu_launches.txt 2>&1
  echo "variables=$args: kernels launched in 3 steps: $(grep -cE '\)x\(' /tmp/ncu_launches.txt)"
done
