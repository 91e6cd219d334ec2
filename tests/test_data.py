"""Tests for tiffio, preprocess and sampling: TIFF IO, normalisation, splits, ROI, sampling, augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from autostructn2v_jax import preprocess, sampling, tiffio
from autostructn2v_jax.errors import ConfigError, UserInputError


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _rand_image(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return (rng.normal(100.0, 20.0, size=shape)).astype(dtype)


def _roundtrip(tmp_path, arr, **imwrite_kwargs):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, arr, **imwrite_kwargs)
    planes, meta = tiffio.read_image(src)
    normed = []
    stats = []
    for p in planes:
        n, s = preprocess.normalize(p)
        normed.append(n)
        stats.append(s)
    back = np.stack([preprocess.denormalize(n, s) for n, s in zip(normed, stats)])
    out = tmp_path / "out.tif"
    tiffio.write_image(out, back, meta)
    return planes, meta, tifffile.imread(out), out


# ----------------------------------------------------------------------------------------------
# reading / writing round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("shape", [(40, 50), (4, 40, 50)])
def test_roundtrip_dtype_and_shape(tmp_path, dtype, shape):
    rng = np.random.default_rng(0)
    arr = _rand_image(rng, shape, dtype)
    planes, meta, written, _ = _roundtrip(tmp_path, arr, photometric="minisblack")
    assert planes.dtype == np.dtype(dtype)
    assert planes.shape == ((1,) + shape if len(shape) == 2 else shape)
    assert meta["dtype"] == dtype and tuple(meta["shape"]) == shape
    assert written.shape == shape and written.dtype == np.dtype(dtype)
    if np.issubdtype(np.dtype(dtype), np.integer):
        np.testing.assert_array_equal(written, arr)
    else:
        np.testing.assert_allclose(written, arr, rtol=1e-5, atol=1e-4)


def test_planar_rgb_three_page_stack_is_rgb_unless_axes(tmp_path):
    # older tifffile versions store a (3, H, W) array written without photometric= like this.
    arr = np.arange(3 * 20 * 20, dtype=np.uint16).reshape(3, 20, 20)
    f = tmp_path / "three.tif"
    tifffile.imwrite(f, arr, photometric="rgb", planarconfig="separate")
    with pytest.warns(UserWarning, match="RGB"):
        planes, _ = tiffio.read_image(f)
    assert planes.shape == (1, 20, 20)
    planes, meta = tiffio.read_image(f, axes="ZYX")
    assert planes.shape == (3, 20, 20)
    np.testing.assert_array_equal(planes, arr)
    out = tmp_path / "o.tif"
    tiffio.write_image(out, planes.astype(np.float32), meta)
    assert tifffile.imread(out).shape == (3, 20, 20)


def test_imagej_metadata_and_resolution_kept(tmp_path):
    arr = np.random.default_rng(1).integers(0, 4000, (5, 32, 30), dtype=np.uint16)
    src = tmp_path / "ij.tif"
    tifffile.imwrite(src, arr, imagej=True, resolution=(2.0, 4.0),
                     metadata={"axes": "TYX", "unit": "um", "finterval": 0.5})
    planes, meta = tiffio.read_image(src)
    assert meta["imagej"] and meta["axes"] == "TYX"
    assert meta["resolution"]["x"] == pytest.approx(2.0)
    assert meta["resolution"]["y"] == pytest.approx(4.0)
    out = tmp_path / "out.tif"
    tiffio.write_image(out, planes.astype(np.float32), meta)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "TYX"
        assert tif.imagej_metadata["unit"] == "um"
        assert tif.imagej_metadata["finterval"] == pytest.approx(0.5)
        np.testing.assert_array_equal(tif.asarray(), arr)
    _, meta2 = tiffio.read_image(out)
    assert meta2["resolution"]["x"] == pytest.approx(2.0)
    assert meta2["resolution"]["y"] == pytest.approx(4.0)


def test_resolution_kept_for_non_imagej_dtype(tmp_path):
    src = tmp_path / "f64.tif"
    arr = np.random.default_rng(2).normal(size=(16, 16))
    tifffile.imwrite(src, arr, resolution=(2.5, 2.5), resolutionunit="CENTIMETER")
    planes, meta = tiffio.read_image(src)
    assert planes.dtype == np.float64
    out = tmp_path / "o.tif"
    tiffio.write_image(out, planes.astype(np.float32), meta)
    planes2, meta2 = tiffio.read_image(out)
    assert planes2.dtype == np.float64
    assert meta2["resolution"] == pytest.approx({"x": 2.5, "y": 2.5, "unit": 3})


def test_write_float32_on_request_and_integer_clipping(tmp_path):
    src = tmp_path / "u8.tif"
    tifffile.imwrite(src, np.full((10, 10), 7, np.uint8))
    _, meta = tiffio.read_image(src)
    vals = np.linspace(-50, 300, 100, dtype=np.float32).reshape(1, 10, 10)
    out = tmp_path / "u8_out.tif"
    tiffio.write_image(out, vals, meta)
    got = tifffile.imread(out)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.clip(np.rint(vals[0]), 0, 255).astype(np.uint8))
    outf = tmp_path / "f_out.tif"
    tiffio.write_image(outf, vals, meta, dtype="float32")
    gotf = tifffile.imread(outf)
    assert gotf.dtype == np.float32
    np.testing.assert_array_equal(gotf, vals[0])


def test_rgb_rule_mean_with_warning(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (24, 26, 3), dtype=np.uint8)
    f = tmp_path / "colour.tif"
    tifffile.imwrite(f, rgb, photometric="rgb")
    with pytest.warns(UserWarning, match="colour.tif"):
        planes, meta = tiffio.read_image(f)
    assert meta["rgb"]
    assert planes.shape == (1, 24, 26) and planes.dtype == np.uint8
    expected = np.rint(rgb.astype(np.float64).mean(axis=-1)).astype(np.uint8)
    np.testing.assert_array_equal(planes[0], expected)
    out = tmp_path / "o.tif"
    tiffio.write_image(out, planes.astype(np.float32), meta)
    assert tifffile.imread(out).shape == (24, 26)


def test_channel_axes_first_channel_with_warning(tmp_path):
    arr = np.stack([np.full((16, 16), 1, np.uint16), np.full((16, 16), 2, np.uint16)])
    f = tmp_path / "chan.tif"
    tifffile.imwrite(f, arr, photometric="minisblack")
    with pytest.warns(UserWarning, match="chan.tif"):
        planes, meta = tiffio.read_image(f, axes="CYX")
    assert planes.shape == (1, 16, 16) and (planes == 1).all()
    assert meta["out_shape"] == [16, 16]


def test_axes_mismatch_and_4d_without_axes(tmp_path):
    f = tmp_path / "stack.tif"
    tifffile.imwrite(f, np.zeros((2, 3, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(UserInputError, match="axes") as ei:
        tiffio.read_image(f)
    assert str(f) in str(ei.value)
    with pytest.raises(UserInputError) as ei:
        tiffio.read_image(f, axes="ZYX")
    assert str(f) in str(ei.value)
    planes, meta = tiffio.read_image(f, axes="TZYX")
    assert planes.shape == (6, 16, 16)
    out = tmp_path / "o.tif"
    tiffio.write_image(out, planes.astype(np.float32), meta)
    assert tifffile.imread(out).shape == (2, 3, 16, 16)
    f2 = tmp_path / "flat.tif"
    tifffile.imwrite(f2, np.zeros((16, 16), np.uint8))
    with pytest.raises(UserInputError) as ei:
        tiffio.read_image(f2, axes="ZYX")
    assert str(f2) in str(ei.value)
    with pytest.raises(UserInputError):
        tiffio.read_image(f2, axes="XY")


# ----------------------------------------------------------------------------------------------
# errors name the file / folder
# ----------------------------------------------------------------------------------------------
def test_list_tiffs(tmp_path):
    for name in ["b.TIF", "a.tif", "c.tiff", "notes.txt"]:
        p = tmp_path / name
        if name.endswith("txt"):
            p.write_text("x")
        else:
            tifffile.imwrite(p, np.zeros((8, 8), np.uint8))
    (tmp_path / "sub").mkdir()
    tifffile.imwrite(tmp_path / "sub" / "d.tif", np.zeros((8, 8), np.uint8))
    assert [p.name for p in tiffio.list_tiffs(tmp_path)] == ["a.tif", "b.TIF", "c.tiff"]


def test_list_tiffs_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserInputError, match=str(missing)):
        tiffio.list_tiffs(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(UserInputError, match=str(empty)):
        tiffio.list_tiffs(empty)
    afile = tmp_path / "file.tif"
    tifffile.imwrite(afile, np.zeros((4, 4), np.uint8))
    with pytest.raises(UserInputError, match=str(afile)):
        tiffio.list_tiffs(afile)


@pytest.mark.parametrize("kind", ["truncated_2d", "truncated_stack", "truncated_imagej",
                                  "garbage", "empty", "nan", "inf", "zero", "complex", "bool",
                                  "missing"])
def test_bad_files_raise_user_input_error_naming_file(tmp_path, kind):
    f = tmp_path / f"bad_{kind}.tif"
    rng = np.random.default_rng(4)
    if kind.startswith("truncated"):
        arr = rng.integers(0, 60000, (64, 64) if kind == "truncated_2d" else (6, 64, 64),
                           dtype=np.uint16)
        tifffile.imwrite(f, arr, imagej=(kind == "truncated_imagej"))
        raw = f.read_bytes()
        f.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        f.write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif kind == "empty":
        f.write_bytes(b"")
    elif kind == "nan":
        arr = np.ones((16, 16), np.float32)
        arr[3, 4] = np.nan
        tifffile.imwrite(f, arr)
    elif kind == "inf":
        arr = np.ones((2, 16, 16), np.float32)
        arr[1, 3, 4] = np.inf
        tifffile.imwrite(f, arr)
    elif kind == "zero":
        with pytest.warns(UserWarning):
            tifffile.imwrite(f, np.zeros((0, 16), np.uint8))
    elif kind == "complex":
        tifffile.imwrite(f, np.ones((16, 16), np.complex64))
    elif kind == "bool":
        tifffile.imwrite(f, np.ones((16, 16), bool))
    with pytest.raises(UserInputError) as ei:
        tiffio.read_image(f)
    msg = str(ei.value)
    assert str(f) in msg and "\n" not in msg
    if kind in ("nan", "inf"):
        assert "NaN/Inf" in msg


def test_check_min_size(tmp_path):
    p1, p2 = tmp_path / "big.tif", tmp_path / "small.tif"
    planes = [np.zeros((2, 64, 64)), np.zeros((1, 64, 20))]
    preprocess.check_min_size(planes[:1], [p1], 32, "stage1.patch_size")
    with pytest.raises(UserInputError) as ei:
        preprocess.check_min_size(planes, [p1, p2], 32, "stage1.patch_size")
    assert str(p2) in str(ei.value) and "32" in str(ei.value)
    assert "stage1.patch_size" in str(ei.value)


def test_atomic_write_and_no_overwrite(tmp_path):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.full((8, 8), 3, np.uint16))
    planes, meta = tiffio.read_image(src)
    out = tmp_path / "res" / "out.tif"
    tiffio.write_image(out, planes.astype(np.float32), meta)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.tif"]
    before = out.read_bytes()
    with pytest.raises(UserInputError, match=str(out)):
        tiffio.write_image(out, planes.astype(np.float32) + 1, meta)
    assert out.read_bytes() == before
    tiffio.write_image(out, planes.astype(np.float32) + 1, meta, overwrite=True)
    assert (tifffile.imread(out) == 4).all()
    # a failed write (NaN) leaves neither a partial file nor a temp file
    bad = tmp_path / "res" / "bad.tif"
    with pytest.raises(UserInputError, match=str(bad)):
        tiffio.write_image(bad, np.full((1, 8, 8), np.nan, np.float32), meta)
    # an exception inside tifffile: the temporary file is removed
    with pytest.raises(Exception):
        tiffio.write_image(bad, planes.astype(np.float32), dict(meta, out_shape=[7, 7]))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.tif"]


def test_failed_imwrite_cleans_temp(tmp_path, monkeypatch):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.full((8, 8), 3, np.uint16))
    planes, meta = tiffio.read_image(src)
    outdir = tmp_path / "o"
    outdir.mkdir()

    def boom(file, *a, **k):
        with open(file, "wb") as fh:
            fh.write(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(UserInputError, match="disk full"):
        tiffio.write_image(outdir / "x.tif", planes.astype(np.float32), meta)
    assert list(outdir.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# normalisation, splits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img", [
    np.full((16, 16), 1234.0),
    np.full((16, 16), 0.1),
    np.zeros((16, 16)),
    1000.0 + 1e-7 * np.arange(256).reshape(16, 16),
    np.arange(256, dtype=np.float32).reshape(16, 16) * 1e-30,
])
def test_normalize_constant_and_tiny_range(img):
    normed, stats = preprocess.normalize(img)
    assert normed.dtype == np.float32 and np.isfinite(normed).all()
    assert np.isfinite(stats["std"]) and stats["std"] > 0
    if np.ptp(img) == 0:
        assert (normed == 0).all()
    back = preprocess.denormalize(normed, stats)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, img.astype(np.float32), rtol=1e-6, atol=1e-30)


def test_normalize_is_standardising_and_invertible():
    x = np.random.default_rng(5).normal(300, 40, (32, 32))
    n, s = preprocess.normalize(x)
    assert abs(n.mean()) < 1e-5 and abs(n.std() - 1) < 1e-5
    np.testing.assert_allclose(preprocess.denormalize(n, s), x, rtol=1e-6)
    assert not np.may_share_memory(n, x)


def test_split_reproducible_disjoint_covering():
    for n in [1, 2, 3, 7, 20, 101]:
        a = preprocess.split_images(n, (0.7, 0.15, 0.15), seed=3)
        b = preprocess.split_images(n, (0.7, 0.15, 0.15), seed=3)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        allidx = np.concatenate(a)
        assert sorted(allidx.tolist()) == list(range(n))
        assert len(a[0]) >= 1
    tr, va, te = preprocess.split_images(20, (0.7, 0.15, 0.15), seed=0)
    assert (len(tr), len(va), len(te)) == (14, 3, 3)
    others = [preprocess.split_images(20, seed=s)[0].tolist() for s in range(5)]
    assert len({tuple(o) for o in others}) > 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       r=st.tuples(st.integers(1, 10), st.integers(0, 10), st.integers(0, 10)))
def test_split_property(n, seed, r):
    ratio = tuple(v / sum(r) for v in r)
    tr, va, te = preprocess.split_images(n, ratio, seed=seed)
    assert len(tr) >= 1
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(n))


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.7, 0.2, 0.2), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1),
                                 "abc", (float("nan"), 0.5, 0.5)])
def test_split_bad_ratio(bad):
    with pytest.raises(ConfigError, match="split_ratio"):
        preprocess.split_images(10, bad, seed=0)


def test_holdout_split_shapes(caplog):
    planes = [np.zeros((100, 80)), np.zeros((40, 200)), np.zeros((40, 40))]
    train, val = preprocess.holdout_split(planes, patch_size=32, fraction=0.15)
    assert train[0].shape == (68, 80) and val[0].shape == (32, 80)
    assert train[1].shape == (40, 168) and val[1].shape == (40, 32)
    assert train[2].shape == (40, 40) and val[2].shape == (40, 40)
    assert any("too small" in r.message for r in caplog.records)
    tr, va = preprocess.holdout_split([np.zeros((1000, 64))], patch_size=16, fraction=0.15)
    assert va[0].shape == (150, 64) and tr[0].shape == (850, 64)


# ----------------------------------------------------------------------------------------------
# ROI
# ----------------------------------------------------------------------------------------------
def _square_image():
    img = np.random.default_rng(6).normal(0.0, 0.05, (128, 128))
    img[48:80, 48:80] += 1.0
    return img


def _overlap(corners, p, lo=48, hi=80):
    y, x = corners[:, 0], corners[:, 1]
    oy = np.clip(np.minimum(y + p, hi) - np.maximum(y, lo), 0, None)
    ox = np.clip(np.minimum(x + p, hi) - np.maximum(x, lo), 0, None)
    return oy * ox / (p * p)


def test_roi_candidates_background_and_foreground():
    img, p = _square_image(), 16
    bg = sampling.roi_candidates(img, p, 0.5, 0.25, select_background=True)
    fg = sampling.roi_candidates(img, p, 0.5, 0.25, select_background=False)
    assert bg.dtype == np.int32 and bg.ndim == 2 and bg.shape[1] == 2
    assert len(bg) > 0 and len(fg) > 0
    # background patches hardly touch the square; foreground patches lie mostly in it
    assert _overlap(bg, p).max() <= 0.25 + 0.15
    assert _overlap(fg, p).min() >= 0.75 - 0.2
    # every grid corner well away from the square is a background candidate and vice versa
    grid = np.stack(np.meshgrid(np.arange(0, 113, 4), np.arange(0, 113, 4), indexing="ij"),
                    -1).reshape(-1, 2)
    far = grid[_overlap(grid, p, 40, 88) == 0]
    inside = grid[_overlap(grid, p) == 1]
    bgset = {tuple(c) for c in bg.tolist()}
    fgset = {tuple(c) for c in fg.tolist()}
    assert all(tuple(c) in bgset for c in far.tolist())
    assert all(tuple(c) in fgset for c in inside.tolist())
    assert not bgset & fgset
    # corners are valid
    assert bg.min() >= 0 and bg.max() <= 128 - p


def test_roi_candidates_fallback_all_corners():
    img = np.zeros((64, 48))
    c = sampling.roi_candidates(img, 16, 0.5, 0.25, select_background=False)
    assert len(c) == len(np.arange(0, 49, 4)) * len(np.arange(0, 33, 4))
    assert c[:, 0].max() == 48 and c[:, 1].max() == 32


# ----------------------------------------------------------------------------------------------
# bank + sampling
# ----------------------------------------------------------------------------------------------
_sample = jax.jit(sampling.sample_patches, static_argnames=("patch_size", "batch_size"))


def _coord_image(h, w, offset=0.0):
    return (np.arange(h * w, dtype=np.float32).reshape(h, w) + offset)


def test_make_bank_random_mode():
    planes = [_coord_image(40, 30), _coord_image(20, 50)]
    bank = sampling.make_bank(planes, 8, use_roi=False)
    assert bank.images.shape == (2, 40, 50) and bank.images.dtype == np.float32
    np.testing.assert_array_equal(bank.shapes, [[40, 30], [20, 50]])
    np.testing.assert_array_equal(bank.corners, [[0, -1, -1], [1, -1, -1]])
    w = np.array([33 * 23, 13 * 43], np.float64)
    np.testing.assert_allclose(bank.weights, w / w.sum(), rtol=1e-6)
    assert (bank.images[0, 40:, :] == 0).all() and (bank.images[0, :, 30:] == 0).all()


def test_sample_patches_are_exact_slices_inside_images():
    h0, w0, h1, w1, p, b = 40, 30, 20, 50, 8, 256
    im0 = _coord_image(h0, w0)
    im1 = _coord_image(h1, w1, offset=10_000.0)
    bank = sampling.make_bank([im0, im1], p, use_roi=False)
    dbank = jax.device_put(bank)
    out = np.asarray(_sample(jax.random.PRNGKey(0), dbank, patch_size=p, batch_size=b))
    assert out.shape == (b, p, p) and out.dtype == np.float32
    counts = [0, 0]
    for patch in out:
        v = patch[0, 0]
        i = 1 if v >= 10_000 else 0
        w = w1 if i else w0
        im = im1 if i else im0
        y, x = divmod(int(v - (10_000 if i else 0)), w)
        assert 0 <= y <= im.shape[0] - p and 0 <= x <= w - p
        np.testing.assert_array_equal(patch, im[y:y + p, x:x + p])
        counts[i] += 1
    assert min(counts) > 0
    out2 = np.asarray(_sample(jax.random.PRNGKey(0), dbank, patch_size=p, batch_size=b))
    np.testing.assert_array_equal(out, out2)
    out3 = np.asarray(_sample(jax.random.PRNGKey(1), dbank, patch_size=p, batch_size=b))
    assert not np.array_equal(out, out3)


def test_sample_patches_never_sample_padding_and_weights_uniform_over_patches():
    # image 0 (small, value 1) and image 1 (large, value 2); zero padding must never appear.
    p, b = 8, 2048
    planes = [np.full((10, 10), 1.0, np.float32), np.full((40, 40), 2.0, np.float32)]
    bank = jax.device_put(sampling.make_bank(planes, p, use_roi=False))
    out = np.asarray(_sample(jax.random.PRNGKey(2), bank, patch_size=p, batch_size=b))
    assert set(np.unique(out).tolist()) <= {1.0, 2.0}
    per_patch = out.reshape(b, -1)
    assert (per_patch.min(1) == per_patch.max(1)).all()  # no patch mixes images
    frac_small = (per_patch[:, 0] == 1.0).mean()
    expected = 9 / (9 + 33 * 33)
    assert abs(frac_small - expected) < 0.02


def test_sample_patches_roi_mode_uses_candidates():
    img = _square_image().astype(np.float32)
    p = 16
    bank = sampling.make_bank([img], p, use_roi=True, roi_threshold=0.5, scale_factor=0.25,
                          select_background=False)
    assert (bank.corners[:, 0] == 0).all() and (bank.corners[:, 1:] >= 0).all()
    np.testing.assert_allclose(bank.weights.sum(), 1.0, rtol=1e-5)
    out = np.asarray(_sample(jax.random.PRNGKey(3), jax.device_put(bank), patch_size=p,
                             batch_size=64))
    # foreground patches are mostly bright
    assert ((out > 0.5).mean(axis=(1, 2)) >= 0.5).all()


# ----------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------
def _variants(x):
    return [np.asarray(f(jnp.asarray(x))) for f, _ in sampling.dihedral_transforms()]


def test_dihedral_transforms_distinct_and_inverses():
    x = np.arange(25, dtype=np.float32).reshape(5, 5)
    vs = _variants(x)
    assert len({v.tobytes() for v in vs}) == 8
    np.testing.assert_array_equal(vs[0], x)
    for f, inv in sampling.dihedral_transforms():
        np.testing.assert_array_equal(np.asarray(inv(f(jnp.asarray(x)))), x)
    # batched NHWC variant on axes (1, 2)
    xb = np.arange(2 * 25, dtype=np.float32).reshape(2, 5, 5, 1)
    for t, (f, inv) in enumerate(sampling.dihedral_transforms(axes=(1, 2))):
        y = np.asarray(f(jnp.asarray(xb)))
        np.testing.assert_array_equal(y[1, ..., 0], _variants(xb[1, ..., 0])[t])
        np.testing.assert_array_equal(np.asarray(inv(jnp.asarray(y))), xb)


def test_augment_same_transform_all_eight_occur():
    x = np.arange(36, dtype=np.float32).reshape(6, 6)
    mask = (x % 5 == 0)
    variants = _variants(x)
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    a, b, m = jax.jit(jax.vmap(sampling.augment, in_axes=(0, None, None, None)))(keys, x, x, mask)
    a, b, m = np.asarray(a), np.asarray(b), np.asarray(m)
    assert m.dtype == np.bool_
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m, a % 5 == 0)  # mask moved with the patch
    seen = set()
    for out in a:
        idx = [i for i, v in enumerate(variants) if np.array_equal(out, v)]
        assert len(idx) == 1
        seen.add(idx[0])
    assert seen == set(range(8))


def test_augment_single_and_batch():
    x = jnp.arange(16.0).reshape(4, 4)
    (y,) = jax.jit(sampling.augment)(jax.random.PRNGKey(4), x)
    assert any(np.array_equal(np.asarray(y), v) for v in _variants(np.asarray(x)))
    batch = jnp.stack([jnp.arange(16.0).reshape(4, 4) + 100 * i for i in range(32)])
    out_a, out_b = jax.jit(sampling.augment_batch)(jax.random.PRNGKey(5), batch, batch * 2)
    np.testing.assert_array_equal(np.asarray(out_b), 2 * np.asarray(out_a))
    kinds = set()
    for i in range(32):
        vs = _variants(np.asarray(batch[i]))
        idx = [j for j, v in enumerate(vs) if np.array_equal(np.asarray(out_a[i]), v)]
        assert len(idx) == 1
        kinds.add(idx[0])
    assert len(kinds) > 1  # per-sample transforms differ
    # a traced `enabled=False` is the identity
    fn = jax.jit(lambda k, b, on: sampling.augment_batch(k, b, enabled=on))
    (same,) = fn(jax.random.PRNGKey(5), batch, jnp.asarray(False))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(batch))
    (turned,) = fn(jax.random.PRNGKey(5), batch, jnp.asarray(True))
    np.testing.assert_array_equal(np.asarray(turned), np.asarray(out_a))
    with pytest.raises(ValueError):
        sampling.augment(jax.random.PRNGKey(0), jnp.zeros((4, 5)))


def test_roi_bank_rows_padded_to_the_corner_grid_and_never_drawn():
    """The ROI candidate count depends on the content; padded to the whole corner grid, two datasets
    of the same plane shapes give the same bank shapes (one compiled train step), and the
    zero-weight padding rows change no draw."""
    rng = np.random.default_rng(0)
    p = 16
    a = [rng.random((64, 64)).astype(np.float32) for _ in range(2)]
    b = [_square_image().astype(np.float32)[:64, :64] + 0.1 * rng.random((64, 64)).astype(np.float32)
         for _ in range(2)]
    banks = [sampling.make_bank(planes, p, use_roi=True) for planes in (a, b)]
    real = [int((bank.weights > 0).sum()) for bank in banks]
    assert real[0] != real[1]  # the contents give different candidate counts ...
    assert banks[0].corners.shape == banks[1].corners.shape  # ... but one bank shape
    for bank, n in zip(banks, real):
        assert len(bank.corners) == 2 * sampling.roi_grid_size((64, 64), p) == 2 * 13 * 13 > n
        np.testing.assert_allclose(bank.weights.sum(), 1.0, rtol=1e-5)
        assert (bank.corners[n:] == bank.corners[n - 1]).all()  # padding repeats a real corner
    # the draws of the padded bank are those of the unpadded one
    bank = banks[1]
    n = real[1]
    unpadded = sampling.ImageBank(bank.images, bank.shapes, bank.corners[:n], bank.weights[:n])
    key = jax.random.PRNGKey(4)
    out = np.asarray(_sample(key, jax.device_put(bank), patch_size=p, batch_size=256))
    ref = np.asarray(_sample(key, jax.device_put(unpadded), patch_size=p, batch_size=256))
    np.testing.assert_array_equal(out, ref)
