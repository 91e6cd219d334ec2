"""The HTML run report, on a hand-built run folder (no training)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tifffile

from autostructn2v_jax.errors import UserInputError
from autostructn2v_jax.report import write_report

NAMES = ("a.tif", "b.tif")


def _tif(path: pathlib.Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr.astype(np.float32))


def _metrics(path: pathlib.Path, epochs: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [dict(epoch=e, step=10 * e, train_loss=1.0 / e, val_loss=1.2 / e, learning_rate=1e-3 / e,
                 seconds=2.0, patches_per_second=100.0 * e, best=True) for e in range(1, epochs + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def make_run(tmp_path: pathlib.Path, *, stage2: bool = True, psnr: bool = True,
             mask_png: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """A fake run folder (and its clean folder) with small real TIFFs; returns (run, clean)."""
    rng = np.random.default_rng(0)
    inp, clean, run = tmp_path / "noisy", tmp_path / "clean", tmp_path / "run"
    stages = ["stage1", "stage2"] if stage2 else ["stage1"]
    for i, name in enumerate(NAMES):
        ref = np.outer(np.linspace(0, 10, 40 + 300 * i), np.ones(48))  # b.tif is taller than the crop
        _tif(clean / name, ref)
        _tif(inp / name, ref + rng.normal(0, 1.0, ref.shape))
        for k, stage in enumerate(stages):
            _tif(run / stage / "denoised" / name, ref + rng.normal(0, 0.5 / (k + 1), ref.shape))
    cfg = {"input_dir": str(inp), "clean_dir": "", "axes": "", "run_stage1": True,
           "run_stage2": stage2, "stage1": {"patch_size": 32, "note": "<b>&"}}
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    summary = {"stages": {s: {"epochs": 3} for s in stages}, "final": stages[-1], "psnr": None}
    for s in stages:
        _metrics(run / s / "metrics.jsonl", 3)
    if stage2:
        summary["stages"]["stage2"]["mask"] = "horizontal line of 7 pixels"
        (run / "mask").mkdir()
        m = np.zeros((9, 9), bool)
        m[4, 1:8] = True
        np.save(run / "mask" / "structural_mask.npy", m)
        np.save(run / "mask" / "autocorrelation.npy", rng.random((9, 9)).astype(np.float32))
        if mask_png:
            import matplotlib.image as mpimg
            mpimg.imsave(run / "mask" / "mask.png", m.astype(float), cmap="gray")
    if psnr:
        summary["psnr"] = {"per_image": {n: {"noisy": 21.25, "stage1": 27.5, "stage2": 31.75} for n in NAMES},
                           "mean": {"noisy": 21.25, "stage1": 27.5, "stage2": 31.75}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run, clean


def _no_temp_files(folder: pathlib.Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".part") or p.name.startswith(".")]


def test_full_run_report(tmp_path):
    run, _ = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report" / "report.html"
    text = path.read_text()
    assert text.count("data:image/png;base64,") >= 2 * 3 + 2  # 2 images x 3 panels, mask, curves
    for number in ("21.25", "27.5", "31.75"):
        assert number in text
    assert "horizontal line of 7 pixels" in text
    assert "&quot;patch_size&quot;: 32" in text and "&lt;b&gt;&amp;" in text and "<b>&" not in text
    assert "mean patches/s" in text and "200" in text  # mean of 100, 200, 300
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert {"mask.png", "curves.png", "image00_noisy.png", "image01_stage2.png"} <= pngs
    assert not any(n.startswith("image02") for n in pngs)
    _no_temp_files(run)


def test_crop_is_one_to_one_and_at_most_256(tmp_path):
    import matplotlib.image as mpimg

    run, _ = make_run(tmp_path)
    write_report(run, max_images=5)
    assert mpimg.imread(run / "report" / "image00_noisy.png").shape[:2] == (40, 48)
    assert mpimg.imread(run / "report" / "image01_stage1.png").shape[:2] == (256, 48)


def test_stage1_only_run(tmp_path):
    run, _ = make_run(tmp_path, stage2=False, psnr=False)
    text = write_report(run, max_images=1).read_text()
    assert "data:image/png;base64," in text
    assert "PSNR" not in text and "structural mask" not in text
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert pngs == {"image00_noisy.png", "image00_stage1.png", "curves.png"}
    _no_temp_files(run)


def test_clean_dir_gives_psnr_table(tmp_path):
    run, clean = make_run(tmp_path, psnr=False)
    text = write_report(run, clean_dir=clean).read_text()
    assert "PSNR (dB)" in text
    assert (run / "report" / "image00_clean.png").is_file()
    table = text.split("PSNR (dB)")[1].split("</table>")[0]
    assert "a.tif" in table and "mean" in table
    from autostructn2v_jax import synth, tiffio
    ref = tiffio.read_image(clean / "a.tif")[0]
    expected = synth.psnr(ref, tiffio.read_image(run / "stage2" / "denoised" / "a.tif")[0])
    assert f"{expected:.4g}" in table


def test_existing_mask_png_is_reused(tmp_path):
    run, _ = make_run(tmp_path, mask_png=True)
    write_report(run, max_images=0)
    assert (run / "report" / "mask.png").read_bytes() == (run / "mask" / "mask.png").read_bytes()


def test_not_a_run_folder(tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(UserInputError, match="not_a_run"):
        write_report(folder)
    assert not (folder / "report").exists()
