"""End to end through the real CLI on real TIFF files: the four modes, predict, extract-mask,
demo-data, resume, and one-line user errors that leave nothing half-written.

Every training run uses the tiny settings in `helpers.TINY` (64x64 images, 8 features, one
epoch), so all runs share the same compiled shapes and the persistent compile cache.
"""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
import time

import numpy as np
import pytest
import tifffile

from autostructn2v_jax import inference, masking
from helpers import (SIZE, TINY, error_lines, noisy_image, read_tiff, run_main, run_subprocess,
                     temp_leftovers, to_uint16, train_args, write_clean_pairs, write_dataset)


# The custom_mask notebook's hand-drawn mask: its quick run and mode 3 here share one compiled step.
H_LINE = np.zeros((5, 5), bool)
H_LINE[2, :] = True


# --------------------------------------------------------------------------- helpers


def _main(argv) -> int:
    from autostructn2v_jax import cli

    return cli.main([str(a) for a in argv])


def _tiffs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".tif")


def _metrics(stage_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime (to prove a folder was left untouched)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _check_outputs(out_dir: pathlib.Path, inputs: list[pathlib.Path], dtype=None) -> None:
    names = sorted(p.name for p in _tiffs(out_dir))
    assert names == sorted(p.name for p in inputs)
    for src in inputs:
        ref = read_tiff(src)
        out = read_tiff(out_dir / src.name)
        assert out.shape == ref.shape, src.name
        assert out.dtype == (np.dtype(dtype) if dtype else ref.dtype), src.name
        assert np.isfinite(out.astype(np.float64)).all(), src.name


def records_step(stage_dir: pathlib.Path) -> int:
    return _metrics(stage_dir)[-1]["step"]


def _check_run(run: pathlib.Path, inputs: list[pathlib.Path], stages: tuple[str, ...], *,
               num_epochs: int = 1) -> dict:
    assert json.loads((run / "config.json").read_text())["output_dir"] == str(run)
    norm = json.loads((run / "normalization.json").read_text())
    assert sorted(norm) == sorted(p.name for p in inputs)
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["stages"]) == sorted(stages)
    assert summary["final"] == stages[-1]
    for name in ("stage1", "stage2"):
        if name not in stages:
            assert not (run / name).exists()
    for name in stages:
        d = run / name
        ckpt = d / "checkpoints"
        # one committed epoch: the last step's folder holds state, best variables and history
        assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == [str(records_step(d))]
        records = _metrics(d)
        assert [r["epoch"] for r in records] == list(range(1, num_epochs + 1))
        assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in records)
        assert summary["stages"][name]["epochs"] == num_epochs
        model = json.loads((d / "model.json").read_text())
        assert model["stage"] == name and model["features"] == 8 and model["patch_size"] == 32
        _check_outputs(d / "denoised", inputs)
    if "stage2" in stages:
        mask = np.load(run / "mask" / "structural_mask.npy", allow_pickle=False)
        assert mask.dtype == bool and mask.ndim == 2
        assert mask.shape[0] % 2 == 1 and mask.shape[1] % 2 == 1
        assert mask[mask.shape[0] // 2, mask.shape[1] // 2]
        assert json.loads((run / "mask" / "extraction.json").read_text())["source"]
        assert summary["stages"]["stage2"]["mask_pixels"] == int(mask.sum())
        model = json.loads((run / "stage2" / "model.json").read_text())
        assert np.array_equal(np.asarray(model["kernel"], bool), mask)
    else:
        assert not (run / "mask").exists()
    assert not temp_leftovers(run), temp_leftovers(run)
    return summary


def _assert_user_error(rc: int, err: str, *names: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def data_dir(work) -> pathlib.Path:
    return write_dataset(work / "data", count=2)


@pytest.fixture(scope="module")
def full_run(work, data_dir):
    """Mode 1 (configs/default.py), in process, stage 2 with the N2V2 network (blur-pool, no top
    skip), so `predict --run` below also checks that a run rebuilds it. Returns (run folder, argv,
    seconds)."""
    run = work / "run_full"
    argv = train_args("default.py", data_dir, run, "--config.stage2.pool=blur", "--config.stage2.top_skip=false")
    t0 = time.perf_counter()
    rc = _main(argv)
    assert rc == 0
    return run, argv, time.perf_counter() - t0


# --------------------------------------------------------------------------- 1. the four modes


@pytest.mark.slow
def test_mode1_full_pipeline(full_run, data_dir):
    run, _, _ = full_run
    summary = _check_run(run, _tiffs(data_dir), ("stage1", "stage2"))
    assert summary["outputs"]["stage2"] == str(run / "stage2" / "denoised")
    meta = json.loads((run / "stage2" / "model.json").read_text())
    assert (meta["pool"], meta["top_skip"]) == ("blur", False)
    assert (json.loads((run / "stage1" / "model.json").read_text())["pool"]) == "max"
    assert summary["stages"]["stage2"]["warm_start"] is False  # auto: the networks differ
    assert (run / "mask" / "autocorrelation.npy").is_file()
    # the denoised images are not just copies of the input
    src = read_tiff(_tiffs(data_dir)[0])
    assert not np.array_equal(read_tiff(run / "stage1" / "denoised" / _tiffs(data_dir)[0].name), src)
    acf = np.load(run / "mask" / "autocorrelation.npy")
    assert acf.ndim == 2 and acf.shape[0] % 2 == 1 and np.isfinite(acf).all()
    # every run ends with a self-contained report
    html = (run / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "stage2" in html


@pytest.mark.slow
def test_report_command(full_run, capsys):
    run, _, _ = full_run
    (run / "report" / "report.html").unlink()
    rc, out, err = run_main(["report", "--run", str(run)], capsys)
    assert rc == 0 and (run / "report" / "report.html").is_file(), err
    rc, out, err = run_main(["report", "--run", str(run / "nope")], capsys)
    _assert_user_error(rc, err, str(run / "nope"))


@pytest.mark.slow
def test_mode2_stage1_only_subprocess(work, data_dir):
    """The real console script in a subprocess (mode 2), relative paths from its cwd."""
    run = work / "run_s1"
    proc = run_subprocess(train_args("stage1_only.py", "data", "run_s1"), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "denoised images: run_s1/stage1/denoised" in proc.stdout
    assert not error_lines(proc.stderr)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"] == "stage1"
    # config.json holds the relative output_dir as given
    assert json.loads((run / "config.json").read_text())["output_dir"] == "run_s1"
    assert sorted(summary["stages"]) == ["stage1"]
    assert not (run / "stage2").exists() and not (run / "mask").exists()
    assert [r["epoch"] for r in _metrics(run / "stage1")] == [1]
    _check_outputs(run / "stage1" / "denoised", _tiffs(data_dir))
    assert not temp_leftovers(work)


@pytest.mark.slow
def test_mode3_stage2_mask_file(tmp_path, data_dir, capsys):
    mask_path = tmp_path / "hline.npy"
    np.save(mask_path, H_LINE)
    run = tmp_path / "run"
    rc, out, err = run_main(train_args("stage2_mask_file.py", data_dir, run,
                                       f"--config.stage2.mask_file_path={mask_path}"), capsys)
    assert rc == 0, err
    _check_run(run, _tiffs(data_dir), ("stage2",))
    mask = np.load(run / "mask" / "structural_mask.npy")
    assert np.array_equal(mask, H_LINE)
    assert json.loads((run / "mask" / "extraction.json").read_text())["source"] == "file"
    assert "structural mask:" in out
    assert json.loads((run / "summary.json").read_text())["stages"]["stage2"]["warm_start"] is False
    # the loaded model knows its blind spot (the pooled noise estimate hides it)
    assert np.array_equal(inference.load_run(run)[2].kernel, masking.crop_kernel(H_LINE))
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_full_pipeline_with_a_centre_mask_warm_starts_stage2(tmp_path, data_dir, capsys):
    """No structure (the centre alone) and the same network: stage 2 continues stage 1's training
    (`stage2.warm_start=auto`; tests/test_train.py checks that the variables are really used).
    The one CLI run with the default `tta` (the tiny runs turn it off)."""
    mask_path = tmp_path / "centre.npy"
    np.save(mask_path, np.ones((1, 1), bool))
    run = tmp_path / "run"
    # stage 2 samples and masks as stage 1 does (ROI, 15 %): its step is stage 1's compiled one
    same_task = ["--config.stage2.use_roi=true", "--config.stage2.select_background=true",
                 "--config.stage2.mask_percentage=15"]
    rc, _, err = run_main(train_args("default.py", data_dir, run, "--config.stage2.mask_source=file",
                                     f"--config.stage2.mask_file_path={mask_path}", "--config.tta=auto",
                                     *same_task), capsys)
    assert rc == 0, err
    summary = _check_run(run, _tiffs(data_dir), ("stage1", "stage2"))
    assert summary["stages"]["stage2"]["warm_start"] is True
    assert summary["stages"]["stage2"]["mask_pixels"] == 1
    # the default tta=auto: both stages trained with augmentation, so the run predicted with TTA;
    # `predict` follows the run, and --no-tta gives another output
    assert summary["stages"]["stage1"]["tta"] is True and summary["stages"]["stage2"]["tta"] is True
    name = _tiffs(data_dir)[0].name
    outs = {}
    for flag in ([], ["--no-tta"]):
        out = tmp_path / ("out" + "".join(flag))
        rc, _, err = run_main(["predict", "--run", run, "--input", data_dir, "--output", out, *flag], capsys)
        assert rc == 0, err
        outs[bool(flag)] = read_tiff(out / name).astype(np.float64)
    np.testing.assert_allclose(outs[False], read_tiff(run / "stage2" / "denoised" / name).astype(np.float64),
                               rtol=1e-4, atol=1.01)
    assert not np.array_equal(outs[True], outs[False])


@pytest.mark.slow
def test_mode4_stage2_extract(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    # The full run's stage-2 network (N2V2 options): same data, so the same extracted mask and the
    # same train step, which this run then finds compiled instead of compiling its own.
    rc, out, err = run_main(train_args("stage2_extract.py", data_dir, run, "--config.stage2.pool=blur",
                                       "--config.stage2.top_skip=false"), capsys)
    assert rc == 0, err
    _check_run(run, _tiffs(data_dir), ("stage2",))
    assert json.loads((run / "mask" / "extraction.json").read_text())["source"] == "extractor"
    assert (run / "mask" / "autocorrelation.npy").is_file()
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_clean_dir_psnr(tmp_path, capsys):
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    write_clean_pairs(noisy, clean)
    run = tmp_path / "run"
    rc, out, err = run_main(train_args("stage1_only.py", noisy, run, f"--config.clean_dir={clean}"), capsys)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["psnr"]["per_image"]) == ["img_0.tif", "img_1.tif"]
    assert set(summary["psnr"]["mean"]) == {"noisy", "stage1"}
    assert "PSNR vs clean (dB)" in out


# --------------------------------------------------------------------------- 5. resume


@pytest.mark.slow
def test_resume_same_command_is_a_no_op(full_run):
    run, argv, first_seconds = full_run
    metrics = {s: (run / s / "metrics.jsonl").read_bytes() for s in ("stage1", "stage2")}
    ckpts = {s: sorted(p.name for p in (run / s / "checkpoints").iterdir())
             for s in ("stage1", "stage2")}
    t0 = time.perf_counter()
    rc = _main(argv)
    seconds = time.perf_counter() - t0
    assert rc == 0
    assert seconds < max(60.0, first_seconds)
    for s in ("stage1", "stage2"):
        assert (run / s / "metrics.jsonl").read_bytes() == metrics[s]  # nothing trained
        assert sorted(p.name for p in (run / s / "checkpoints").iterdir()) == ckpts[s]
        assert [r["epoch"] for r in _metrics(run / s)] == [1]
    _check_run(run, _tiffs(run.parent / "data"), ("stage1", "stage2"))


@pytest.mark.slow
def test_different_config_in_output_dir_refused(full_run, data_dir, capsys):
    run, argv, _ = full_run
    before = _snapshot(run)
    rc, out, err = run_main(argv + ["--config.stage1.learning_rate=0.002"], capsys)
    _assert_user_error(rc, err, str(run), "overwrite")
    assert _snapshot(run) == before


# --------------------------------------------------------------------------- 2. predict


@pytest.mark.slow
def test_predict_folder_and_files(full_run, data_dir, tmp_path, capsys):
    run, _, _ = full_run
    out = tmp_path / "out"
    rc, stdout, err = run_main(["predict", "--run", run, "--input", data_dir, "--output", out], capsys)
    assert rc == 0, err
    assert "wrote 2 file(s)" in stdout
    _check_outputs(out, _tiffs(data_dir))
    # the same model as the run's own final output
    for p in _tiffs(data_dir):
        np.testing.assert_allclose(read_tiff(out / p.name).astype(np.float64),
                                   read_tiff(run / "stage2" / "denoised" / p.name).astype(np.float64),
                                   rtol=1e-4, atol=1.01 if p.name.endswith("1.tif") else 1e-3)

    # a uint16 single file and a multi-page float32 and uint16 stack (3, 64, 64)
    extra = tmp_path / "extra"
    extra.mkdir()
    tifffile.imwrite(extra / "single_u16.tif", to_uint16(noisy_image(11)))
    stack = np.stack([noisy_image(20 + i) for i in range(3)])
    # photometric minisblack: a (3, H, W) array is a stack of 3 pages, not a planar RGB image
    tifffile.imwrite(extra / "stack_f32.tif", stack, photometric="minisblack")
    tifffile.imwrite(extra / "stack_u16.tif", to_uint16(stack), photometric="minisblack")
    assert read_tiff(extra / "stack_f32.tif").shape == (3, SIZE, SIZE)
    out2 = tmp_path / "out2"
    for f in _tiffs(extra):
        rc, _, err = run_main(["predict", "--run", run, "--input", f, "--output", out2], capsys)
        assert rc == 0, err
    _check_outputs(out2, _tiffs(extra))

    # --float32 and --stage stage1
    out3 = tmp_path / "out3"
    rc, _, err = run_main(["predict", "--run", run, "--input", extra, "--output", out3, "--float32",
                           "--stage", "stage1"], capsys)
    assert rc == 0, err
    _check_outputs(out3, _tiffs(extra), dtype="float32")
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_predict_overwrite(full_run, data_dir, tmp_path, capsys):
    run, _, _ = full_run
    src = _tiffs(data_dir)[0]
    out = tmp_path / "out"
    out.mkdir()
    target = out / src.name
    tifffile.imwrite(target, np.zeros((5, 7), np.uint8))
    before = target.read_bytes()
    mtime = target.stat().st_mtime_ns
    rc, _, err = run_main(["predict", "--run", run, "--input", src, "--output", out], capsys)
    _assert_user_error(rc, err, str(target), "--overwrite")
    assert target.read_bytes() == before and target.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == [src.name]

    rc, _, err = run_main(["predict", "--run", run, "--input", src, "--output", out, "--overwrite"], capsys)
    assert rc == 0, err
    replaced = read_tiff(target)
    assert replaced.shape == (SIZE, SIZE) and replaced.dtype == read_tiff(src).dtype
    assert sorted(p.name for p in out.iterdir()) == [src.name]
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_predict_errors(full_run, data_dir, tmp_path, capsys):
    run, _, _ = full_run
    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    out = tmp_path / "out"
    rc, _, err = run_main(["predict", "--run", not_run, "--input", data_dir, "--output", out], capsys)
    _assert_user_error(rc, err, str(not_run))
    assert not out.exists()

    rc, _, err = run_main(["predict", "--run", run, "--input", tmp_path / "missing", "--output", out], capsys)
    _assert_user_error(rc, err, str(tmp_path / "missing"))
    assert not out.exists()

    # config overrides are refused for predict (argparse error, exit 2)
    rc, _, err = run_main(["predict", "--run", run, "--input", data_dir, "--output", out,
                           "--config.num_epochs=2"], capsys)
    assert rc == 2 and "only for train and extract-mask" in err
    assert not out.exists()


# --------------------------------------------------------------------------- 3. other commands


def test_extract_mask(data_dir, tmp_path, capsys):
    out = tmp_path / "mask.npy"
    args = ["extract-mask", "--input", data_dir, "--output", out,
            "--config.stage2.extractor.num_patches=50", "--config.stage2.extractor.patch_size=32"]
    rc, stdout, err = run_main(args, capsys)
    assert rc == 0, err
    mask = np.load(out, allow_pickle=False)
    assert mask.dtype == bool and mask.ndim == 2 and mask.shape[0] % 2 == 1 and mask.shape[1] % 2 == 1
    assert mask[mask.shape[0] // 2, mask.shape[1] // 2]
    assert str(out) in stdout
    # the written mask is accepted by mode 3's loader
    from autostructn2v_jax import maskfile

    assert np.array_equal(maskfile.load_mask_file(out), mask)

    before = out.read_bytes()
    rc, _, err = run_main(args, capsys)
    _assert_user_error(rc, err, str(out), "--overwrite")
    assert out.read_bytes() == before
    rc, _, err = run_main(args + ["--overwrite"], capsys)
    assert rc == 0, err

    missing_out = tmp_path / "m2.npy"
    rc, _, err = run_main(["extract-mask", "--input", tmp_path / "nope", "--output", missing_out], capsys)
    _assert_user_error(rc, err, str(tmp_path / "nope"))
    assert not missing_out.exists()
    assert not temp_leftovers(tmp_path)


def test_demo_data_and_help_subprocess(tmp_path):
    proc = run_subprocess(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for cmd in ("train", "predict", "extract-mask", "report", "demo-data"):
        assert cmd in proc.stdout

    proc = run_subprocess(["demo-data", "demo", "--count", "2", "--size", "64", "--noise", "white"],
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    noisy, clean = tmp_path / "demo" / "noisy", tmp_path / "demo" / "clean"
    assert [p.name for p in _tiffs(noisy)] == [p.name for p in _tiffs(clean)]
    assert len(_tiffs(noisy)) == 2
    for p in _tiffs(noisy):
        a, b = read_tiff(p), read_tiff(clean / p.name)
        assert a.shape == b.shape == (64, 64)
        assert not np.array_equal(a, b)
    assert not temp_leftovers(tmp_path)

    # a user error through the real script: one line on stderr, exit 2
    proc = run_subprocess(["-q", "train", "--config", "configs_missing.py"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == error_lines(proc.stderr)
    assert len(error_lines(proc.stderr)) == 1 and "configs_missing.py" in proc.stderr


def test_print_config(capsys):
    rc, out, err = run_main(["train", "--config", pathlib.Path(__file__).parent.parent / "configs" / "stage1_only.py",
                             "--print-config", "--config.stage1.patch_size=64"], capsys)
    assert rc == 0, err
    cfg = json.loads(out)
    assert cfg["run_stage2"] is False and cfg["stage1"]["patch_size"] == 64


def test_default_config_from_any_directory(tmp_path, monkeypatch, capsys):
    """Without --config, train and extract-mask use the built-in defaults (not a cwd-relative path)."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(["train", "--print-config"], capsys)
    assert rc == 0, err
    from autostructn2v_jax import config as config_lib

    assert json.loads(out) == json.loads(config_lib.to_json(config_lib.load_config(
        str(pathlib.Path(__file__).parent.parent / "configs" / "default.py"))))
    write_dataset(tmp_path / "in", count=1, uint16_last=False)
    rc, _, err = run_main(["extract-mask", "--input", "in", "--output", "sub/mask.npy",
                           "--config.stage2.extractor.num_patches=50",
                           "--config.stage2.extractor.patch_size=32"], capsys)
    assert rc == 0, err
    assert np.load(tmp_path / "sub" / "mask.npy").dtype == bool


def test_subcommand_help_lists_options(capsys):
    rc, out, _ = run_main(["predict", "--help"], capsys)
    assert rc == 0
    for flag in ("--run", "--input", "--output", "--float32", "--overwrite"):
        assert flag in out


# --------------------------------------------------------------------------- 4. bad input


def _bad_input_truncated(folder: pathlib.Path) -> pathlib.Path:
    write_dataset(folder, count=1, uint16_last=False)
    path = folder / "truncated.tif"
    tifffile.imwrite(path, noisy_image(5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_input_garbage(folder: pathlib.Path) -> pathlib.Path:
    write_dataset(folder, count=1, uint16_last=False)
    path = folder / "garbage.tif"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    return path


def _bad_input_small(folder: pathlib.Path) -> pathlib.Path:
    write_dataset(folder, count=1, uint16_last=False)
    path = folder / "small.tif"
    tifffile.imwrite(path, noisy_image(6, size=16))
    return path


def _bad_input_nan(folder: pathlib.Path) -> pathlib.Path:
    write_dataset(folder, count=1, uint16_last=False)
    path = folder / "nan.tif"
    img = noisy_image(7)
    img[10, 10] = np.nan
    tifffile.imwrite(path, img)
    return path


def _bad_input_missing(folder: pathlib.Path) -> pathlib.Path:
    return folder  # never created


def _bad_input_no_tiffs(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "image.png").write_bytes(b"\x89PNG")
    return folder


@pytest.mark.parametrize("make, extra", [
    (_bad_input_missing, ()),
    (_bad_input_no_tiffs, ()),
    (_bad_input_truncated, ()),
    (_bad_input_garbage, ()),
    (_bad_input_small, ("stage1.patch_size",)),
    (_bad_input_nan, ("NaN",)),
], ids=["missing_folder", "no_tiffs", "truncated", "garbage", "too_small", "nan"])
def test_bad_input_files(make, extra, tmp_path, capsys):
    folder = tmp_path / "in"
    named = make(folder)
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("default.py", folder, run), capsys)
    _assert_user_error(rc, err, str(named), *extra)
    assert not run.exists()
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_bad_input_predict_garbage_file(full_run, tmp_path, capsys):
    """A folder with a good file (sorted first) and a garbage one: error, and nothing written."""
    run, _, _ = full_run
    garbage = _bad_input_garbage(tmp_path / "in").rename(tmp_path / "in" / "zz_garbage.tif")
    assert _tiffs(tmp_path / "in")[0] != garbage
    out = tmp_path / "out"
    rc, _, err = run_main(["predict", "--run", run, "--input", tmp_path / "in", "--output", out], capsys)
    _assert_user_error(rc, err, str(garbage))
    assert not out.exists()
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_output_paths_that_are_files(full_run, data_dir, tmp_path, capsys):
    run, _, _ = full_run
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run_main(train_args("stage1_only.py", data_dir, afile), capsys)
    _assert_user_error(rc, err, str(afile))
    rc, _, err = run_main(["predict", "--run", run, "--input", data_dir, "--output", afile], capsys)
    _assert_user_error(rc, err, str(afile))
    rc, _, err = run_main(["extract-mask", "--input", data_dir, "--output", tmp_path, "--overwrite"], capsys)
    _assert_user_error(rc, err, str(tmp_path))
    assert afile.read_text() == "x"
    assert not temp_leftovers(tmp_path)


def test_demo_data_bad_arguments(tmp_path, capsys):
    for args in (["--size", "0"], ["--count", "0"]):
        rc, _, err = run_main(["demo-data", tmp_path / "demo", *args], capsys)
        _assert_user_error(rc, err, args[0])
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("override, key", [
    ("--config.stage1.patch_size=30", "stage1.patch_size"),
    ("--config.stage1.mask_percentage=0", "stage1.mask_percentage"),
    ("--config.stage2.mask_percentage=60", "stage2.mask_percentage"),
    ("--config.stage1.nope=1", "stage1.nope"),
    ("--config.nope.deeper=1", "nope.deeper"),
    ("--config.stage1.batch_size=abc", "stage1.batch_size"),
    ("--config.num_epochs=1.5", "num_epochs"),
    ("--config.run_stage2=maybe", "run_stage2"),
    ("--config.stage1.learning_rate=2", "stage1.learning_rate"),
    ("--config.stage2.extractor.center_size=4", "stage2.extractor.center_size"),
    ("--config.stage2.mask_source=bogus", "stage2.mask_source"),
    ("--config.stage1.replacement_strategy=mode", "stage1.replacement_strategy"),
    ("--config.split_ratio=(0.5,0.1)", "split_ratio"),
    ("--config.stage1.num_layers=0", "stage1.num_layers"),
    ("--config.cpu_devices=-1", "cpu_devices"),
    ("--config.cpu_devices=two", "cpu_devices"),
    ("--config.stage1.pool=average", "stage1.pool"),
    ("--config.stage2.top_skip=maybe", "stage2.top_skip"),
], ids=lambda v: v if not v.startswith("--") else v[len("--config."):])
def test_bad_config_values(override, key, tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("default.py", data_dir, run, override), capsys)
    _assert_user_error(rc, err, key)
    assert not run.exists()
    assert not temp_leftovers(tmp_path)


def test_missing_required_config(tmp_path, capsys):
    rc, _, err = run_main(["-q", "train", "--config", pathlib.Path(__file__).parent.parent / "configs" / "default.py",
                           *TINY], capsys)
    _assert_user_error(rc, err, "input_dir")


def _mask_not_2d(p):
    np.save(p, np.ones((3, 3, 3), bool))


def _mask_even(p):
    np.save(p, np.ones((2, 3), bool))


def _mask_false_centre(p):
    m = H_LINE.copy()
    m[2, 2] = False
    np.save(p, m)


def _mask_non_boolean(p):
    np.save(p, H_LINE.astype(np.int32) * 2)


def _mask_pickle(p):
    with open(p, "wb") as fh:
        np.save(fh, np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)


def _mask_raw_pickle(p):
    with open(p, "wb") as fh:
        pickle.dump(H_LINE, fh)


def _mask_missing(p):
    pass


@pytest.mark.parametrize("make", [_mask_not_2d, _mask_even, _mask_false_centre, _mask_non_boolean,
                                  _mask_pickle, _mask_raw_pickle, _mask_missing],
                         ids=lambda f: f.__name__[len("_mask_"):])
def test_bad_mask_file(make, tmp_path, data_dir, capsys):
    mask_path = tmp_path / "mask.npy"
    make(mask_path)
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("stage2_mask_file.py", data_dir, run,
                                     f"--config.stage2.mask_file_path={mask_path}"), capsys)
    _assert_user_error(rc, err, str(mask_path))
    assert not run.exists()
    assert not temp_leftovers(tmp_path)


def test_mask_file_larger_than_patch(tmp_path, data_dir, capsys):
    mask_path = tmp_path / "long.npy"
    np.save(mask_path, np.ones((1, 35), bool))
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("stage2_mask_file.py", data_dir, run,
                                     f"--config.stage2.mask_file_path={mask_path}"), capsys)
    _assert_user_error(rc, err, str(mask_path), "stage2.patch_size")
    assert not run.exists()


def test_mask_file_path_required(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("stage2_mask_file.py", data_dir, run), capsys)
    _assert_user_error(rc, err, "stage2.mask_file_path")
    assert not run.exists()


def test_mismatched_clean_dir(tmp_path, capsys):
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    write_clean_pairs(noisy, clean)
    tifffile.imwrite(clean / "img_1.tif", np.zeros((48, 64), np.float32))  # wrong shape
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("stage1_only.py", noisy, run, f"--config.clean_dir={clean}"), capsys)
    _assert_user_error(rc, err, str(clean / "img_1.tif"))
    assert not run.exists()

    (clean / "img_1.tif").unlink()  # no reference for one input
    rc, _, err = run_main(train_args("stage1_only.py", noisy, run, f"--config.clean_dir={clean}"), capsys)
    _assert_user_error(rc, err, str(clean / "img_1.tif"))
    assert not run.exists()
    assert not temp_leftovers(tmp_path)


@pytest.mark.slow
def test_constant_image_trains(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "const_f32.tif", np.full((SIZE, SIZE), 0.5, np.float32))
    tifffile.imwrite(folder / "const_u16.tif", np.full((SIZE, SIZE), 300, np.uint16))
    run = tmp_path / "run"
    rc, _, err = run_main(train_args("stage1_only.py", folder, run), capsys)
    assert rc == 0, err
    _check_run(run, _tiffs(folder), ("stage1",))
    # A constant plane normalises to zeros with the std floor 1e-6 * max(1, |mean|); the output is
    # the network's answer to an all-zero input scaled by that floor, around the constant.
    norm = json.loads((run / "normalization.json").read_text())
    assert norm["const_f32.tif"] == [{"mean": 0.5, "std": 1e-6}]
    assert norm["const_u16.tif"] == [{"mean": 300.0, "std": pytest.approx(3e-4)}]

    _, _, model = inference.load_run(run)
    answer = np.abs(model(np.zeros((SIZE, SIZE), np.float32))).max()
    out = read_tiff(run / "stage1" / "denoised" / "const_f32.tif")
    assert np.abs(out - 0.5).max() <= 1e-6 * answer + 6e-8  # float32 rounding at 0.5
    assert np.all(read_tiff(run / "stage1" / "denoised" / "const_u16.tif") == 300)


def test_run_folder_from_incompatible_version(tmp_path, capsys):
    from autostructn2v_jax import config as config_lib

    run = tmp_path / "old_run"
    (run / "stage1").mkdir(parents=True)
    (run / "config.json").write_text(config_lib.to_json(config_lib.base_config()))
    (run / "stage1" / "model.json").write_text(json.dumps({"format_version": 999, "features": 8,
                                                           "num_layers": 2, "patch_size": 32}))
    img = tmp_path / "x.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.float32))
    rc, _, err = run_main(["predict", "--run", str(run), "--input", str(img), "--output", str(tmp_path / "o")], capsys)
    _assert_user_error(rc, err, "model.json", "incompatible")
    (run / "config.json").write_text(json.dumps({"no_such_key": 1}))
    rc, _, err = run_main(["predict", "--run", str(run), "--input", str(img), "--output", str(tmp_path / "o")], capsys)
    _assert_user_error(rc, err, "no_such_key")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_time_budget_stops_training_then_predicts_and_reports(tmp_path, data_dir, capsys, caplog):
    caplog.set_level(logging.INFO, logger="autostructn2v_jax")
    run = tmp_path / "run"
    argv = train_args("stage1_only.py", data_dir, run, "--config.num_epochs=500",
                      "--config.time_budget_minutes=0.03")
    rc, out, err = run_main([a for a in argv if a != "-q"], capsys)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    stage = summary["stages"]["stage1"]
    assert stage["out_of_time"] is True and 1 <= stage["epochs"] < 500
    assert any(" left" in r.getMessage() for r in caplog.records)  # progress shows the time left
    assert all("time_left_seconds" in r for r in _metrics(run / "stage1"))
    _check_outputs(run / "stage1" / "denoised", _tiffs(data_dir))
    assert "budget used" in (run / "report" / "report.html").read_text()
