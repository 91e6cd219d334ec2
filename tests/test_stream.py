"""Strip-by-strip denoising of large TIFFs equals whole-image prediction; memory stays bounded."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from autostructn2v_jax import models, predict, preprocess, stream
from autostructn2v_jax.errors import UserInputError

TILE = 160


@pytest.fixture(scope="module")
def variables():
    return models.init_variables(8, 2, 32, 0)


def _reference(variables, planes):
    out = []
    for plane in planes:
        normed, stats = preprocess.normalize(plane)
        out.append(preprocess.denormalize(predict.predict_image(variables, normed, tile_size=TILE), stats))
    return np.stack(out)


@pytest.mark.parametrize("kind", ["uint16_2d", "float32_stack", "compressed_stack"])
def test_streamed_equals_in_memory(tmp_path, variables, kind):
    rng = np.random.default_rng(0)
    if kind == "uint16_2d":
        arr = (rng.random((530, 300)) * 4000 + 100).astype(np.uint16)
        tifffile.imwrite(tmp_path / "in.tif", arr, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    else:
        # 8 tiles of TILE per plane: the streamed planes' batch is the in-memory default (8), one
        # compiled forward for every case here
        arr = rng.standard_normal((3, 200, 340)).astype(np.float32)
        extra = {"compression": "zlib"} if kind == "compressed_stack" else {}
        tifffile.imwrite(tmp_path / "in.tif", arr, photometric="minisblack", metadata={"axes": "ZYX"}, **extra)
    out = stream.denoise_tiff(variables, tmp_path / "in.tif", tmp_path / "out" / "in.tif",
                              apply_fn=models.make_apply_fn(8, 2), num_layers=2, tile_size=TILE)
    got = tifffile.imread(out)
    assert got.shape == arr.shape and got.dtype == arr.dtype
    ref = _reference(variables, arr.reshape(-1, *arr.shape[-2:])).reshape(arr.shape)
    if arr.dtype == np.uint16:
        assert np.abs(got.astype(np.int64) - np.rint(ref).astype(np.int64)).max() <= 1
        with tifffile.TiffFile(out) as tif:
            assert tif.is_imagej and tif.imagej_metadata.get("unit") == "um"
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_stream_refuses_overwrite_and_nan(tmp_path, variables):
    arr = np.ones((64, 64), np.float32)
    arr[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", arr)
    with pytest.raises(UserInputError, match="nan.tif"):
        stream.denoise_tiff(variables, tmp_path / "nan.tif", tmp_path / "o.tif",
                            apply_fn=models.make_apply_fn(8, 2), num_layers=2, tile_size=TILE)
    assert not (tmp_path / "o.tif").exists() and not list(tmp_path.glob(".*tmp"))
    (tmp_path / "o.tif").write_bytes(b"keep")
    with pytest.raises(UserInputError, match="o.tif"):
        stream.denoise_tiff(variables, tmp_path / "nan.tif", tmp_path / "o.tif",
                            apply_fn=models.make_apply_fn(8, 2), num_layers=2, tile_size=TILE)
    assert (tmp_path / "o.tif").read_bytes() == b"keep"


def test_streamed_posterior_step_lies_between_prediction_and_observation(tmp_path, variables):
    """With the posterior-mean step each output pixel moves from the prediction towards the noisy
    pixel (never past it), and the result differs from the plain prediction."""
    rng = np.random.default_rng(1)
    arr = (0.5 + 0.1 * rng.standard_normal((300, 170))).astype(np.float32)
    tifffile.imwrite(tmp_path / "in.tif", arr)
    kw = dict(apply_fn=models.make_apply_fn(8, 2), num_layers=2, tile_size=TILE)
    plain = tifffile.imread(stream.denoise_tiff(variables, tmp_path / "in.tif", tmp_path / "a.tif", **kw))
    post = tifffile.imread(stream.denoise_tiff(variables, tmp_path / "in.tif", tmp_path / "b.tif",
                                               posterior_mean="gaussian", **kw))
    assert not np.allclose(post, plain)
    toward = (post - plain) * (arr - plain)
    assert toward.min() >= -1e-6
    assert np.all(np.abs(post - plain) <= np.abs(arr - plain) + 1e-5)
