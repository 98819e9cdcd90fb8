"""``adamax-ps bench``: run the measurement suite in ``benchmarks/`` of a source checkout.

    adamax-ps bench transport [--quick] [--json t.json] [--png t.png]
    adamax-ps bench all --quick --out-dir results/       (each benchmark: NAME.json, NAME.png)
    adamax-ps bench shards --net netns loopback          (shard scaling; netns needs root)

Each benchmark runs as its own ``python benchmarks/bench_NAME.py`` process (they spawn
servers and workers of their own); arguments after the name are passed on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS = ("transport", "overlap", "scaling", "memory", "wire", "adapters", "shards")


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` next to ``server/`` in a checkout; None in an installed wheel."""
    candidate = Path(__file__).resolve().parents[3] / "benchmarks"
    return candidate if (candidate / "_common.py").is_file() else None


def run_bench(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="adamax-ps bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=(*BENCHMARKS, "all"))
    parser.add_argument("--out-dir", default=None, help="write NAME.json and NAME.png here")
    args, rest = parser.parse_known_args(list(argv))
    directory = benchmarks_dir()
    if directory is None:
        print("the benchmarks live in the source checkout (benchmarks/); run adamax-ps bench from there",
              file=sys.stderr)
        return 2
    status = 0
    for name in BENCHMARKS if args.name == "all" else (args.name,):
        extra = list(rest)
        if args.out_dir is not None:
            os.makedirs(args.out_dir, exist_ok=True)
            extra += ["--json", os.path.join(args.out_dir, f"{name}.json"),
                      "--png", os.path.join(args.out_dir, f"{name}.png")]
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(directory / f"bench_{name}.py"), *extra])
        status = status or code
    return status
