"""Start ``adamax-ps serve`` on 127.0.0.1 (a free port) for the examples; stop it on exit."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """Yield the target ("127.0.0.1:PORT") of a server running in a subprocess."""
    cmd = [sys.executable, "-c", "import sys; from adamax_server.cli import main; sys.exit(main())",
           "--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on"):
            raise RuntimeError(f"the server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(30)
