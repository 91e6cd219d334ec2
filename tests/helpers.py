"""Shared helpers for the end-to-end CLI tests: tiny TIFF datasets, tiny configs, CLI runners."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import tifffile

from autostructn2v_jax import synth

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
CACHE_DIR = REPO / ".jax_cache"
CLI = REPO / ".venv" / "bin" / "autostructn2v"

SIZE = 64
# The train planes of a CLI test run (two SIZE x SIZE images, too few for an image split: each gives
# its top half to training, see preprocess.holdout_split). Tests that call train.train_stage
# directly train (and validate) on two planes of this shape, so they share the CLI runs' compiled
# stage-1 step and validation draw (the bank's shapes depend only on the planes' shapes,
# sampling.make_bank).
TRAIN_PLANE = (SIZE // 2, SIZE)

# Tiny settings shared by every training run in the CLI tests (one compile shape for all modes).
TINY = [
    "--config.num_epochs=1",
    "--config.stage1.features=8", "--config.stage2.features=8",
    "--config.stage1.patch_size=32", "--config.stage2.patch_size=32",
    "--config.stage1.patches_per_image=8", "--config.stage2.patches_per_image=8",
    "--config.stage1.batch_size=4", "--config.stage2.batch_size=4",
    "--config.stage1.num_val_patches=8", "--config.stage2.num_val_patches=8",
    "--config.stage2.extractor.num_patches=50", "--config.stage2.extractor.patch_size=32",
    "--config.stage1.predict_tile_size=64", "--config.stage2.predict_tile_size=64",
    # stage 2 at stage 1's depth, so the two stages' predictions share one compiled function (the
    # default depth 3 of stage 2 is trained by tests/test_quality.py)
    "--config.stage2.num_layers=2",
    # one prediction per tile instead of eight: test_cli.py's centre-mask run turns TTA back on
    # (the default) and checks it; everywhere else it would only add compile time
    "--config.tta=off",
]


def noisy_image(seed: int, size: int = SIZE, case: str = "hcorr") -> np.ndarray:
    rng = np.random.default_rng(seed)
    return synth.add_noise(rng, synth.clean_image(rng, size), case)


def to_uint16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 1000.0 + 200.0), 0, 65535).astype(np.uint16)


def write_dataset(folder: os.PathLike, *, count: int = 2, size: int = SIZE, uint16_last: bool = True,
                  seed: int = 0) -> pathlib.Path:
    """`count` noisy `size`x`size` TIFFs (float32; the last one uint16 when `uint16_last`)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = noisy_image(seed + i, size)
        if uint16_last and i == count - 1:
            img = to_uint16(img)
        tifffile.imwrite(folder / f"img_{i}.tif", img)
    return folder


def write_clean_pairs(noisy: os.PathLike, clean: os.PathLike, *, count: int = 2, size: int = SIZE,
                      seed: int = 0) -> None:
    noisy, clean = pathlib.Path(noisy), pathlib.Path(clean)
    noisy.mkdir(parents=True, exist_ok=True)
    clean.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        c = synth.clean_image(rng, size)
        tifffile.imwrite(clean / f"img_{i}.tif", c)
        tifffile.imwrite(noisy / f"img_{i}.tif", synth.add_noise(rng, c, "hcorr"))


def train_args(config: str, input_dir: os.PathLike, output_dir: os.PathLike, *extra: str) -> list[str]:
    return ["-q", "train", "--config", str(CONFIGS / config), f"--config.input_dir={input_dir}",
            f"--config.output_dir={output_dir}", *TINY, *extra]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """In-process CLI run: (exit code, stdout, stderr)."""
    from autostructn2v_jax import cli

    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors / --help
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(argv: list[str], cwd: os.PathLike, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real console script, with the repo's persistent compile cache."""
    env = dict(os.environ, AUTOSTRUCTN2V_CACHE_DIR=str(CACHE_DIR))
    exe = str(CLI) if CLI.exists() else None
    cmd = [exe] if exe else [sys.executable, "-m", "autostructn2v_jax.cli"]
    return subprocess.run(cmd + [str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("autostructn2v: error:")]


def temp_leftovers(root: os.PathLike) -> list[pathlib.Path]:
    """Temporary / partial files anywhere under `root` (atomic writes must leave none)."""
    bad = []
    for p in pathlib.Path(root).rglob("*"):
        name = p.name
        if (name.endswith(".part") or name.endswith(".tmp") or name.startswith(".tmp")
                or "orbax-checkpoint-tmp" in name):
            bad.append(p)
    return bad


def read_tiff(path: os.PathLike) -> np.ndarray:
    return tifffile.imread(path)
