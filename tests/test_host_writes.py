"""Multi-host runs: only the main process writes host-side files (simulated process index)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tifffile

from autostructn2v_jax import config as config_lib
from autostructn2v_jax import inference, parallel, pipeline, synth, train


@pytest.fixture(params=[True, False], ids=["process0", "process1"])
def main_process(request, monkeypatch) -> bool:
    monkeypatch.setattr(parallel, "is_main_process", lambda: request.param)
    return request.param


def _files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_is_main_process_is_process_zero():
    import jax

    assert parallel.is_main_process() == (jax.process_index() == 0)


def test_run_folder_writes_only_on_the_main_process(main_process, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "a.tif", synth.add_noise(rng, synth.clean_image(rng, 32), "white"))
    ds = pipeline.load_dataset(folder)
    cfg = config_lib.base_config()
    cfg.stage2.mask_source, cfg.stage2.patch_size = "file", 32
    run = tmp_path / "run"
    run.mkdir()

    (run / "stage1").mkdir()
    pipeline.write_text_atomic(run / "summary.json", "{}")
    train._write_metrics(run / "stage1" / "metrics.jsonl", [{"epoch": 1}])
    inference.save_model_json(run / "stage1", cfg.stage1, np.ones((1, 1), bool), "stage1")
    class Halve:  # a stand-in model: prediction = plane / 2, final = prediction + 1
        def __call__(self, plane):
            return plane * 0.5

        def finish_all(self, normed, predictions, stats):
            return [[p + 1.0 for p in planes] for planes in predictions]

    outs, raws = pipeline.denoise_dataset(Halve(), ds, run / "stage1" / "denoised", cfg)
    line = np.zeros((3, 5), bool)
    line[1] = True
    mask, info = pipeline.find_mask(cfg, ds, ds.flat(), run, mask_file=line)

    # every process computes the same results ...
    np.testing.assert_allclose(raws[0][0], ds.normed[0][0] * 0.5)
    np.testing.assert_allclose(outs[0][0], ds.normed[0][0] * 0.5 + 1.0)
    assert np.array_equal(mask, line) and info["summary"]
    # ... and only process 0 writes them
    expected = ["mask/extraction.json", "mask/mask.png", "mask/structural_mask.npy",
                "stage1/denoised/a.tif", "stage1/metrics.jsonl", "stage1/model.json", "summary.json"]
    assert _files(run) == (expected if main_process else [])
    if main_process:
        assert (run / "stage1" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'



@pytest.mark.slow
def test_pipeline_on_a_second_process_leaves_only_checkpoints(main_process, tmp_path):
    synth.write_demo_data(tmp_path / "d", count=2, size=64, case="white", seed=0)
    cfg = config_lib.load_config(str(pathlib.Path(__file__).resolve().parent.parent / "configs/stage1_only.py"))
    cfg.input_dir, cfg.output_dir = str(tmp_path / "d" / "noisy"), str(tmp_path / "run")
    cfg.num_epochs = 1
    s = cfg.stage1
    s.features, s.patch_size, s.patches_per_image, s.num_val_patches, s.predict_tile_size = 8, 32, 8, 8, 64
    s.batch_size, cfg.tta = 4, "off"  # the CLI tests' stage-1 shapes; plain predictions
    summary = pipeline.run_pipeline(cfg)
    assert summary["stages"]["stage1"]["epochs"] == 1  # trained in either case
    files = _files(tmp_path / "run")
    outside = [f for f in files if not f.startswith("stage1/checkpoints/")]
    assert any(f.startswith("stage1/checkpoints/") for f in files)  # orbax writes for every process
    if main_process:
        assert {"config.json", "normalization.json", "summary.json", "stage1/metrics.jsonl",
                "stage1/model.json", "stage1/denoised/image_00.tif", "report/report.html"} <= set(outside)
        assert len(json.loads((tmp_path / "run" / "stage1" / "model.json").read_text())["kernel"]) == 3
    else:
        assert outside == []
