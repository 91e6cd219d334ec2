"""Which XLA:CPU library runs the network's convolutions: environment override, the per-machine
measurement and its cache file, and the same numbers either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autostructn2v_jax import compile_options, models
from autostructn2v_jax.errors import UserInputError
from helpers import error_lines, run_main


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A clean choice (not the process's cached one) whose cache file lives in ``tmp_path``."""
    compile_options.cpu_conv_library.cache_clear()
    monkeypatch.setattr(compile_options, "_cache_path", lambda: tmp_path / compile_options.CACHE_FILE)
    monkeypatch.delenv(compile_options.ENV_VAR, raising=False)
    yield tmp_path / compile_options.CACHE_FILE
    compile_options.cpu_conv_library.cache_clear()


@pytest.mark.parametrize("value", ["ynnpack", "eigen", " Eigen "])
def test_environment_variable_decides(fresh, monkeypatch, value):
    monkeypatch.setenv(compile_options.ENV_VAR, value)
    assert compile_options.cpu_conv_library() == value.strip().lower()
    expected = None if value == "ynnpack" else {"xla_cpu_experimental_ynn_fusion_type":
                                                 compile_options._WITHOUT_CONV}
    assert compile_options.network_options() == expected
    assert not fresh.exists()  # nothing measured, nothing written


def test_bad_environment_value_names_the_variable(fresh, monkeypatch):
    monkeypatch.setenv(compile_options.ENV_VAR, "mkl")
    with pytest.raises(UserInputError, match="AUTOSTRUCTN2V_CPU_CONV must be one of auto, ynnpack, eigen"):
        compile_options.cpu_conv_library()


def test_cli_refuses_a_bad_value_before_writing(fresh, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(compile_options.ENV_VAR, "mkl")
    out = tmp_path / "run"
    rc, _, err = run_main(["train", f"--config.input_dir={tmp_path}", f"--config.output_dir={out}"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert error_lines(err) == err.strip().splitlines() and compile_options.ENV_VAR in err
    assert not out.exists()


def test_auto_measures_once_per_machine_and_keeps_the_answer(fresh, monkeypatch):
    library = compile_options.cpu_conv_library()  # a real measurement on this machine
    assert library in ("ynnpack", "eigen")
    stored = json.loads(fresh.read_text())[compile_options.machine_key()]
    assert stored["library"] == library and stored["ynnpack_ms"] > 0 and stored["eigen_ms"] > 0
    assert (stored["eigen_ms"] <= compile_options.WIN_RATIO * stored["ynnpack_ms"]) == (library == "eigen")
    # A new process on the same machine reads the file instead of measuring again.
    compile_options.cpu_conv_library.cache_clear()

    def no_measuring(*_, **__):
        raise AssertionError("measured again")

    monkeypatch.setattr(compile_options, "measure", no_measuring)
    assert compile_options.cpu_conv_library() == library
    # Another machine's entry in the same file is kept beside this one's.
    fresh.write_text(json.dumps({"other cpu": {"library": "eigen"}, **json.loads(fresh.read_text())}))
    compile_options.cpu_conv_library.cache_clear()
    assert compile_options.cpu_conv_library() == library


def test_before_jax_starts_the_measurement_runs_in_a_child_process(tmp_path):
    """The command line decides the CPU split before JAX starts: the choice must not start it."""
    code = ("import json; from jax._src import xla_bridge as xb; "
            "from autostructn2v_jax import compile_options as c; lib = c.cpu_conv_library(); "
            "print(json.dumps([lib, xb.backends_are_initialized()]))")
    env = {**os.environ, "AUTOSTRUCTN2V_CACHE_DIR": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": ""}
    env.pop(compile_options.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    library, started = json.loads(proc.stdout.strip().splitlines()[-1])
    assert library in ("ynnpack", "eigen") and not started
    stored = json.loads((tmp_path / compile_options.CACHE_FILE).read_text())
    assert [v["library"] for v in stored.values()] == [library]


def test_small_networks_need_no_measurement(fresh, monkeypatch):
    def no_measuring(*_, **__):
        raise AssertionError("measured")

    monkeypatch.setattr(compile_options, "measure", no_measuring)
    monkeypatch.setattr(compile_options, "_measure_in_child", no_measuring)
    assert compile_options.stage_library(compile_options.EIGEN_MIN_FEATURES - 1) == "ynnpack"
    assert not fresh.exists()


def test_small_networks_keep_ynnpack_unless_forced(fresh, monkeypatch):
    fresh.write_text(json.dumps({compile_options.machine_key(): {"library": "eigen"}}))
    small, big = compile_options.EIGEN_MIN_FEATURES // 2, compile_options.EIGEN_MIN_FEATURES
    assert compile_options.stage_library(small) == "ynnpack"
    assert compile_options.stage_library(big) == compile_options.stage_library(None) == "eigen"
    assert compile_options.network_options(small) is None
    assert compile_options.network_options(big) == compile_options._OPTIONS["eigen"]
    assert models.make_apply_fn(small, 2).features == small  # what train/predict pass on
    monkeypatch.setenv(compile_options.ENV_VAR, "eigen")
    compile_options.cpu_conv_library.cache_clear()
    assert compile_options.stage_library(small) == "eigen"  # the user's word goes


def test_user_flags_and_other_backends_keep_xla_defaults(fresh, monkeypatch):
    monkeypatch.setenv(compile_options.ENV_VAR, "eigen")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert compile_options.network_options() is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compile_options.network_options() is None


def test_both_libraries_give_the_same_training_gradients():
    """The U-Net's loss and gradients (CPU "edges" and stock convolutions, small layers included)
    agree between the two libraries to float32 rounding."""
    apply_fn = models.make_apply_fn(8, 2)
    variables = models.init_variables(8, 2, 32, 0)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 1))

    def loss(params):
        out, _ = apply_fn({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True)
        return jnp.mean((out - x) ** 2)

    results = [jax.jit(jax.value_and_grad(loss), compiler_options=compile_options._OPTIONS[name])(
        variables["params"]) for name in ("ynnpack", "eigen")]
    (l1, g1), (l2, g2) = results
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3,
                                   atol=2e-4 * float(np.abs(np.asarray(a)).max()) + 1e-7)
