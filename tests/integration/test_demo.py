"""The README's main job: the demo trains through a real server and matches local Keras."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("sklearn")

from adamax_server.cli.demo import run_demo


def _accuracies(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"test accuracy (\d\.\d+)", text)]


@pytest.mark.parametrize("mode", ["inprocess", "server"])
def test_demo_trains_and_matches_keras(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(["--mode", mode, "--workers", "2", "--epochs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ours, keras_acc = _accuracies(out)
    assert ours > 0.85, out
    # Same data, batches, initial weights and optimizer: within a few test images of Keras.
    assert abs(ours - keras_acc) <= 0.02, out
    if mode == "server":  # Keras model.fit through the adapter: the same run as a local fit
        assert "jit_compile=True" in out, out
        difference = float(re.search(r"weights: (\S+)", out).group(1))
        assert difference < 1e-4, out
