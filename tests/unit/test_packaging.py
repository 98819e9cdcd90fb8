"""pyproject.toml as setuptools reads it: no deprecation warnings, an SPDX license, a pinned backend."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_applies_without_setuptools_warnings() -> None:
    pytest.importorskip("setuptools")
    script = (
        "import warnings\n"
        "from setuptools.dist import Distribution\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    dist = apply_configuration(Distribution(), 'pyproject.toml')\n"
        "for w in seen:\n"
        "    print('WARNING', w.category.__name__, str(w.message).splitlines()[0])\n"
        "print('LICENSE', dist.metadata.license_expression)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stdout, out.stdout
    assert "LICENSE Apache-2.0" in out.stdout, out.stdout


def test_license_is_an_spdx_string_and_the_backend_is_pinned() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["license"] == "Apache-2.0"
    requires = config["build-system"]["requires"]
    setuptools_req = next(r for r in requires if r.startswith("setuptools"))
    # SPDX license strings need setuptools 77; an upper bound keeps a future major from breaking builds.
    assert re.fullmatch(r"setuptools>=(\d+)(\.\d+)*,<(\d+)", setuptools_req.replace(" ", "")), setuptools_req
    low = int(re.search(r">=(\d+)", setuptools_req).group(1))
    assert low >= 77
