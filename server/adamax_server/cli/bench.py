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
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS = ("transport", "overlap", "scaling", "memory", "wire", "adapters", "datapath", "shards")


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` next to ``server/`` in a checkout; None in an installed wheel."""
    candidate = Path(__file__).resolve().parents[3] / "benchmarks"  # server/adamax_server/cli/bench.py
    return candidate if (candidate / "_common.py").is_file() else None


def _plain(text: str) -> str:
    """reST inline markup of the benchmarks' docstrings as plain text for a terminal."""
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"(?m)::$", ":", text)


def _summary(directory: Path | None, name: str) -> str:
    """The first docstring line of ``bench_NAME.py``, without running it."""
    if directory is None:
        return ""
    try:
        import ast

        doc = ast.get_docstring(ast.parse((directory / f"bench_{name}.py").read_text())) or ""
    except (OSError, SyntaxError):
        return ""
    return _plain(doc.splitlines()[0]) if doc else ""


def _benchmark_help(directory: Path, name: str) -> int:
    """``bench_NAME.py --help``, as ``adamax-ps bench NAME`` and in plain text."""
    proc = subprocess.run([sys.executable, str(directory / f"bench_{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    text = proc.stdout.replace(f"usage: bench_{name}.py", f"usage: adamax-ps bench {name}", 1)
    sys.stdout.write(_plain(text))
    sys.stderr.write(proc.stderr)
    return proc.returncode


def run_bench(argv: Sequence[str]) -> int:
    argv = list(argv)
    directory = benchmarks_dir()
    listing = "\n".join(f"  {n:<10} {_summary(directory, n)}" for n in BENCHMARKS)
    parser = argparse.ArgumentParser(
        prog="adamax-ps bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the measurement suite in benchmarks/ of a source checkout. Each benchmark runs\n"
                    "as its own process; arguments after the name are passed on to it.",
        epilog=f"benchmarks:\n{listing}\n  all        every benchmark (with --out-dir: NAME.json, NAME.png each)\n\n"
               "`adamax-ps bench NAME --help` shows a benchmark's own options.",
    )
    parser.add_argument("name", choices=(*BENCHMARKS, "all"), help="the benchmark to run")
    parser.add_argument("--out-dir", default=None, help="write NAME.json and NAME.png here")
    names = [a for a in argv if not a.startswith("-")]
    if names and names[0] in BENCHMARKS and ("-h" in argv or "--help" in argv):
        if directory is None:
            print("the benchmarks live in the source checkout (benchmarks/); run adamax-ps bench from there",
                  file=sys.stderr)
            return 2
        return _benchmark_help(directory, names[0])
    args, rest = parser.parse_known_args(argv)
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
