"""The notebooks run top to bottom (tiny settings via AUTOSTRUCTN2V_NOTEBOOK_QUICK) and are stored stripped."""

from __future__ import annotations

import json
import math
import pathlib

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

EXPECTED_FILES = {
    "quickstart": ["run/stage1/denoised/image_00.tif", "run/stage2/denoised/image_01.tif",
                   "run/mask/structural_mask.npy", "run/report/report.html"],
    "custom_mask": ["hand_mask.npy", "mask_run/stage2/denoised/image_01.tif",
                    "mask_run/mask/structural_mask.npy"],
}
EXPECTED_FIGURES = {"quickstart": 3, "custom_mask": 1}
EXPECTED_PSNR = {"quickstart": {"noisy", "stage1", "stage2"}, "custom_mask": {"noisy", "stage2"}}

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSTRUCTN2V_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("AUTOSTRUCTN2V_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as outputs
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [out for cell in nb.cells for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    # what each notebook promises: its run folder, its figures and the numbers it prints
    for name in EXPECTED_FILES[path.stem]:
        assert (tmp_path / name).is_file(), name
    assert len(figures) == EXPECTED_FIGURES[path.stem], len(figures)
    psnr = json.loads(text.split("PSNR (dB): ")[1].splitlines()[0].replace("'", '"'))
    assert set(psnr) == EXPECTED_PSNR[path.stem] and all(math.isfinite(v) for v in psnr.values())
    if path.stem == "custom_mask":  # the hand-drawn mask is the one stage 2 trained with
        assert np.array_equal(np.load(tmp_path / "mask_run/mask/structural_mask.npy"),
                              np.load(tmp_path / "hand_mask.npy"))
