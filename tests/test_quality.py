"""Denoising quality on synthetic data with known ground truth (measured PSNR margins).

Each test trains small networks (features 8, patch 32, batch 8) for a few epochs on four 128 x 128
synthetic images and compares PSNR (dB) against the clean references.  The thresholds are set well
below what was measured on 2 CPU cores (numbers next to each threshold, seeds 0-2), so they catch
a method that stopped working, not run-to-run noise.  Runs are deterministic for a given seed.
Measured (2026-12-02, Intel Xeon, 2 cores, the four tests of then on 2 workers): 53 s with an
empty compile cache. The augmentation check is now part of the x-correlated test (its stage 2 is
the augmented run), which saves a third training of the same stage.

    pytest -m slow tests/test_quality.py -s     # -s prints the reached PSNR values
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from autostructn2v_jax import config, extraction, pipeline, synth

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent
SEED = 0

# Stage 1 on white Gaussian noise (sigma 0.1): measured +11.34 / +11.27 / +10.36 dB (seeds 0 / 1 / 2,
# 2026-12-02).
STAGE1_MIN_GAIN_DB = 6.0
# Stage 2 over stage 1 on x-correlated noise: measured +7.27 / +4.85 / +3.57 dB (seeds 0 / 1 / 2,
# 2026-12-04, twelfth session, clustered copies of line masks; +6.64 / +4.50 / +3.57 without). The
# mask is a 9-pixel horizontal line for seeds 0 and 1; for seed 2 it is 13 pixels (3x9: the line
# and 4 pixels of the rows next to it, not a line, so no cluster), which the line check below
# would reject.
STAGE2_MIN_GAIN_DB = 2.0
# Stage 2 over stage 1 on 2-D (Gaussian sigma 1) correlated noise, 5 epochs: measured +4.64 / +3.57 /
# +2.50 dB (seeds 0 / 1 / 2, 2026-12-04, depth 3; masks of 35, 31 and 51 pixels, 7x5 to 7x9;
# +2.82 / +5.08 / +3.31 at depth 2; seed 2 re-measured +2.31 in the twelfth session). With clustered
# copies of these 2-D masks (not the default: masking.use_cluster) +3.73 / +3.41 / +1.63.
STAGE2_2D_MIN_GAIN_DB = 1.4
# Seed 0 on the Intel Xeon of 2026-12-04 with XLA's own (Eigen) CPU convolutions (compile_options):
# white +11.42 dB, x-correlated +7.54 dB, 2-D +4.79 dB.
# (An augmentation check, augmented vs plain stage 2 within 0.7 dB, was dropped on 2026-12-04: on
# an Intel machine correct code measured -0.78 / -0.38 / +0.78 dB and code that drew the mask after
# turning the patch -1.60 / -1.60 / -0.49 (seeds 0 / 1 / 2), so no tolerance separates them.
# tests/test_train.py::test_structural_masks_turn_with_the_augmented_patch checks it exactly.)


def small_config(data_dir: pathlib.Path, run_dir: pathlib.Path, *, seed: int = SEED,
                 epochs: int = 5):
    """demo.py shrunk to ~1 s per epoch on 2 CPU cores (compilation dominates the runtime)."""
    cfg = config.load_config(str(REPO / "configs" / "demo.py"))
    cfg.input_dir = str(data_dir / "noisy")
    cfg.clean_dir = str(data_dir / "clean")
    cfg.output_dir = str(run_dir)
    cfg.random_seed = seed
    cfg.num_epochs = epochs
    cfg.early_stopping_patience = epochs  # the budget, not early stopping, ends these runs
    cfg.tta = "off"  # the margins below were measured on plain predictions (TTA adds to both stages)
    for stage in (cfg.stage1, cfg.stage2):
        stage.patch_size = 32
        stage.batch_size = 8
        stage.features = 8
        stage.learning_rate = 1e-3
        stage.patches_per_image = 160  # 4 images: 2 train planes -> 40 steps per epoch
        stage.num_val_patches = 32
        stage.use_augmentation = True
    return cfg


@pytest.fixture(scope="module")
def hcorr_data(tmp_path_factory) -> pathlib.Path:
    """Four 128 x 128 images with noise correlated along x (box of 5, std 0.08) + white std 0.04."""
    return synth.write_demo_data(tmp_path_factory.mktemp("hcorr"), count=4, size=128, case="hcorr",
                                 seed=SEED)


def test_stage1_improves_psnr_on_white_noise(tmp_path):
    data_dir = synth.write_demo_data(tmp_path / "data", count=4, size=128, case="white", seed=SEED)
    cfg = small_config(data_dir, tmp_path / "run")
    cfg.run_stage2 = False
    psnr = pipeline.run_pipeline(cfg)["psnr"]["mean"]
    gain = psnr["stage1"] - psnr["noisy"]
    print(f"\nstage 1, white noise: noisy {psnr['noisy']:.2f} dB, stage 1 {psnr['stage1']:.2f} dB "
          f"(+{gain:.2f} dB; threshold +{STAGE1_MIN_GAIN_DB} dB)")
    assert gain >= STAGE1_MIN_GAIN_DB, psnr


def test_stage2_beats_stage1_on_x_correlated_noise(hcorr_data, tmp_path):
    cfg = small_config(hcorr_data, tmp_path / "run")
    # The raw images' autocorrelation finds the x-structure reliably (see the mask-source study);
    # passed explicitly so the test does not depend on the default source.
    cfg.stage2.mask_source = "extractor"
    summary = pipeline.run_pipeline(cfg)
    psnr = summary["psnr"]["mean"]
    mask_path = tmp_path / "run" / "mask" / "structural_mask.npy"
    mask = np.load(mask_path)
    c = mask.shape[0] // 2
    gain = psnr["stage2"] - psnr["stage1"]
    print(f"\nx-correlated noise: noisy {psnr['noisy']:.2f} dB, stage 1 {psnr['stage1']:.2f} dB, "
          f"stage 2 {psnr['stage2']:.2f} dB (+{gain:.2f} dB over stage 1; threshold "
          f"+{STAGE2_MIN_GAIN_DB} dB); mask: {extraction.mask_summary(mask)}")
    # The mask is a horizontal segment through the centre, at least 3 pixels long.
    assert mask[c].sum() >= 3 and mask.sum() == mask[c].sum(), extraction.mask_summary(mask)
    assert psnr["stage1"] > psnr["noisy"], psnr
    assert gain >= STAGE2_MIN_GAIN_DB, psnr


def test_stage2_beats_stage1_on_2d_correlated_noise(tmp_path):
    # Noise blurred by a Gaussian of sigma 1 (correlated in every direction): the default
    # (deconvolved) extractor must find a 2-D mask, and stage 2 must gain over stage 1.
    data_dir = synth.write_demo_data(tmp_path / "data", count=4, size=128, case="corr2d", seed=SEED)
    # 5 epochs, as the other quality tests. (An earlier version of the package, with a 41-pixel
    # mask, was at -0.7 dB after 5 epochs and needed 15; re-measured 2026-12-02: see above.)
    cfg = small_config(data_dir, tmp_path / "run")
    cfg.stage2.mask_source = "extractor"
    psnr = pipeline.run_pipeline(cfg)["psnr"]["mean"]
    mask = np.load(tmp_path / "run" / "mask" / "structural_mask.npy")
    gain = psnr["stage2"] - psnr["stage1"]
    print(f"\n2-D correlated noise: noisy {psnr['noisy']:.2f} dB, stage 1 {psnr['stage1']:.2f} dB, "
          f"stage 2 {psnr['stage2']:.2f} dB (+{gain:.2f} dB over stage 1; threshold "
          f"+{STAGE2_2D_MIN_GAIN_DB} dB); mask: {extraction.mask_summary(mask)}")
    ys, xs = np.nonzero(mask)
    assert np.ptp(ys) >= 2 and np.ptp(xs) >= 2 and mask.sum() >= 9, extraction.mask_summary(mask)
    assert gain >= STAGE2_2D_MIN_GAIN_DB, psnr
