"""``adamax_client.keras.RemoteAdamax`` in ``model.fit`` with jit on, against a local Keras Adamax fit.

Keras picks its backend once per process, and this suite runs on the numpy backend, so each
backend's run happens in a subprocess (tests/_adapter_keras_fit.py) against a server started here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _ps_helpers import REPO_ROOT, running_server

pytest.importorskip("keras")

BACKENDS = {"jax": "jax", "torch": "torch"}
HELPER = Path(__file__).resolve().parent.parent / "_adapter_keras_fit.py"


def run_fit(backend: str, target: str, workdir: Path, jit: bool) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / d) for d in ("client", "wire", "server") if (REPO_ROOT / d).is_dir()]
        + [env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, str(HELPER), target, str(workdir), "1" if jit else "0"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_jitted_model_fit_matches_local_adamax_and_resumes_from_a_checkpoint(backend, tmp_path):
    pytest.importorskip(BACKENDS[backend])
    with running_server() as (target, _):
        out = run_fit(backend, target, tmp_path, jit=True)
    assert out["backend"] == backend
    assert out["jit_compile"] is True
    # Variables are named by path (unique), less the model's own scope.
    assert out["names"] == out["expected_names"]
    assert len(set(out["names"])) == 4 and all("/" in n for n in out["names"])
    # Same seed, same batches, same LearningRateScheduler: equal to float tolerance (the forward
    # and backward passes are compiled differently around the callback, the update is exact).
    assert out["fit_max_diff"] < 1e-5, out
    ours, local, server = out["iterations"]
    assert ours == local == server == 18
    assert out["learning_rate"][0] == pytest.approx(out["learning_rate"][1]) == pytest.approx(0.0025)
    assert out["learning_rate"][2] == pytest.approx(0.0025)
    # save_own_variables holds what a local Adamax holds, in the same layout.
    assert out["store_keys"][0] == out["store_keys"][1]
    assert out["store_max_diff"] < 1e-5, out
    # ModelCheckpoint file -> load_model on a deleted job -> the last epoch again: same weights.
    assert out["deleted"] is True
    assert out["restored_type"] == "RemoteAdamax"
    assert out["restored_iterations"] == 12
    assert out["resume_iterations"] == 18
    assert out["resume_max_diff"] == 0.0, out


def test_the_plain_client_names_keras_variables_by_path_so_apply_gradients_works():
    """Keras 3 ``v.name`` repeats (kernel, bias, kernel, bias): the client uses ``v.path``."""
    import keras
    import numpy as np

    from adamax_client import RemoteAdamax

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    variables = model.trainable_variables
    assert len({v.name for v in variables}) == 2  # the trap
    twin_vars = [keras.Variable(np.array(v.numpy())) for v in variables]
    twin = keras.optimizers.Adamax(learning_rate=0.1)
    twin.build(twin_vars)
    rng = np.random.default_rng(0)
    with running_server() as (target, _):
        with RemoteAdamax(target, optimizer="paths", learning_rate=0.1) as opt:
            opt.build(variables)
            assert [name for name, _, _ in opt.variable_specs] == [v.path for v in variables]
            grads = [rng.standard_normal(v.shape).astype("float32") for v in variables]
            opt.apply_gradients(zip(grads, variables))
            twin.apply(grads)
            for path, value in opt.pull().items():
                expected = twin_vars[[v.path for v in variables].index(path)].numpy()
                np.testing.assert_array_equal(value, expected)
