"""The scripts of examples/ run as a user would run them (one epoch, their own local server)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from _ps_helpers import REPO_ROOT

pytest.importorskip("sklearn")


def _run(script: str, *args: str) -> str:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # the example picks its own
    env["PYTHONPATH"] = os.pathsep.join(str(REPO_ROOT / d) for d in ("server", "client", "wire"))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / script), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_torch_example_trains_two_workers():
    pytest.importorskip("torch")
    out = _run("torch_two_workers.py", "--epochs", "2")
    accuracy = [float(a) for a in re.findall(r"test accuracy (\d\.\d+)", out)]
    assert len(accuracy) == 2 and accuracy[-1] > 0.85, out
    assert "via shm" in out


@pytest.mark.slow
def test_keras_example_fits_two_workers(tmp_path):
    pytest.importorskip("jax")
    out = _run("keras_fit_two_workers.py", "--epochs", "2", "--out-dir", str(tmp_path))
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.85 and "jit_compile=True" in out, out
    assert (tmp_path / "digits.keras").is_file()
