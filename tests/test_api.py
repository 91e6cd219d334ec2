"""The public Python API: the whole job in a few lines."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import autostructn2v_jax as asn2v
from autostructn2v_jax import synth

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY = {"num_epochs": 1, "stage1.features": 8, "stage1.patch_size": 32, "stage1.patches_per_image": 8,
        "stage1.num_val_patches": 8, "stage1.predict_tile_size": 64,
        # the CLI tests' stage-1 shapes (one compile in the persistent cache), plain predictions
        "stage1.batch_size": 4, "tta": "off"}


@pytest.mark.slow
def test_five_line_job(tmp_path):
    synth.write_demo_data(tmp_path / "d", count=2, size=64, case="white", seed=0)
    cfg = asn2v.load_config(str(ROOT / "configs/stage1_only.py"), input_dir=str(tmp_path / "d" / "noisy"),
                            output_dir=str(tmp_path / "run"), **TINY)
    summary = asn2v.run(cfg)
    noisy = np.random.default_rng(0).random((40, 52)).astype(np.float32) * 100 + 500
    out = asn2v.denoise(tmp_path / "run", noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert abs(out.mean() - noisy.mean()) < 0.2 * noisy.std()  # in the input's units
    stack = asn2v.denoise(tmp_path / "run", np.stack([noisy, noisy]))
    np.testing.assert_allclose(stack[1], out, rtol=1e-5, atol=1e-3)
    assert summary["final"] == "stage1"


def test_extract_mask_from_arrays():
    rng = np.random.default_rng(1)
    planes = [synth.correlated_noise(rng, (128, 128), 5, axis=1) for _ in range(4)]
    cfg = asn2v.load_config("configs/default.py").stage2.extractor
    cfg.num_patches, cfg.use_background = 400, False
    mask, info = asn2v.extract_mask(planes, cfg)
    c = mask.shape[0] // 2
    assert mask[c].sum() >= 3 and mask.sum() == mask[c].sum()  # a horizontal line through the centre
