"""Interrupted runs: a real SIGKILL at a random moment, then the same command resumes and finishes
with the same final parameters as an uninterrupted run. Inputs are never modified."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from autostructn2v_jax import synth, train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cmd(data_dir: pathlib.Path, run: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "autostructn2v_jax.cli", "-q", "train",
            "--config", str(ROOT / "configs/stage1_only.py"),
            f"--config.input_dir={data_dir}", f"--config.output_dir={run}",
            "--config.num_epochs=5", "--config.early_stopping=false", "--config.stage1.features=8",
            # the CLI tests' stage-1 shapes (helpers.TINY: patch 32, batch 4, no TTA), so the step,
            # validation and prediction come from the shared compile cache; 96 patches per image
            # keep each epoch long enough (48 steps) for the kill to land before the run ends
            "--config.stage1.patch_size=32", "--config.tta=off",
            "--config.stage1.batch_size=4", "--config.stage1.patches_per_image=96",
            "--config.stage1.num_val_patches=8", "--config.stage1.steps_per_dispatch=2",
            "--config.stage1.predict_tile_size=64"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("AUTOSTRUCTN2V_CACHE_DIR", str(ROOT / ".jax_cache"))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _digest(folder: pathlib.Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _final_params(run: pathlib.Path):
    meta = json.loads((run / "stage1" / "model.json").read_text())
    variables = train.load_stage_variables(run / "stage1", meta["features"], meta["num_layers"],
                                           meta["patch_size"])
    return variables


def committed_epoch(checkpoints: pathlib.Path) -> int:
    """The epoch of the last complete checkpoint (0 without one), from its own loop state."""
    steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), reverse=True) \
        if checkpoints.exists() else []
    for step in steps:
        meta = checkpoints / str(step) / "meta" / "metadata"
        if meta.is_file():
            return json.loads(meta.read_text())["loop"]["epoch"]
    return 0


def epochs_done(metrics: pathlib.Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    synth.write_demo_data(tmp_path / "data", count=2, size=64, case="white", seed=3)
    data_dir = tmp_path / "data" / "noisy"
    before = _digest(data_dir)

    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(data_dir, ref), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    run = tmp_path / "run"
    rng = np.random.default_rng(int(time.time()))
    proc = subprocess.Popen(_cmd(data_dir, run), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "stage1" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    time.sleep(float(rng.uniform(0.0, 1.5)))  # a random moment: mid-epoch, mid-checkpoint or later
    assert proc.poll() is None, "training finished before the kill: make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # Whatever the moment, what is on disk is a consistent prefix: metrics lines 1..k with no
    # duplicate or gap, none without its committed checkpoint, and denoised images only after the
    # last epoch.
    done = epochs_done(metrics)
    assert done == list(range(1, len(done) + 1)), done
    assert len(done) <= committed_epoch(run / "stage1" / "checkpoints")
    assert not (run / "stage1" / "denoised").exists() or done == [1, 2, 3, 4, 5]

    again = subprocess.run(_cmd(data_dir, run), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]

    assert epochs_done(metrics) == [1, 2, 3, 4, 5]
    ref_losses = [json.loads(line)["val_loss"] for line in (ref / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(line)["val_loss"] for line in metrics.read_text().splitlines()] == ref_losses
    a, b = _final_params(ref), _final_params(run)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _digest(run / "stage1" / "denoised") == _digest(ref / "stage1" / "denoised")
    assert _digest(data_dir) == before  # inputs never modified
    assert not list(tmp_path.rglob("*.part"))
