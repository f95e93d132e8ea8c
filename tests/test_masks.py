"""jret.masks against direct numpy transcriptions of seed 004 eq. 1–3 and the reference code."""

import cv2
import jax
import numpy as np
import pytest

from jret import masks

RNG = np.random.default_rng(0)


def relu_map(*shape, levels=None):
    x = np.maximum(RNG.normal(size=shape), 0)
    if levels is not None:  # few distinct values: many ties
        x = np.round(x * levels) / levels
    return x.astype(np.float32)


def np_max_mask(fm, valid):
    """Eq. 2: for every channel the first (row-major) arg-max location, united."""
    out = np.zeros(fm.shape[:2], bool)
    if not valid.any():
        return out
    for k in range(fm.shape[2]):
        ch = np.where(valid, fm[:, :, k], -np.inf)
        y, x = np.unravel_index(np.argmax(ch), ch.shape)
        out[y, x] = True
    return out


def np_max_mask_reference(fm):
    """The MATLAB reference: column maxima, then the max of those (column-major first index)."""
    out = np.zeros(fm.shape[:2], bool)
    for k in range(fm.shape[2]):
        ch = fm[:, :, k]
        p1 = ch.argmax(axis=0)
        p2 = ch.max(axis=0).argmax()
        out[p1[p2], p2] = True
    return out


def np_sum_mask(fm, valid):
    """Eq. 3: channel sums at least their median over the valid cells."""
    s = fm.astype(np.float64).sum(-1)
    if not valid.any():
        return np.zeros_like(valid)
    return valid & (s >= np.median(s[valid]))


@pytest.fixture
def batch():
    fm = relu_map(4, 7, 9, 32)
    valid = np.ones((4, 7, 9), bool)
    valid[1, 5:] = False
    valid[2, :, 6:] = False
    valid[3] = False
    return fm, valid


def test_max_mask_matches_transcription(batch):
    fm, valid = batch
    got = np.asarray(masks.max_mask(fm, valid))
    for i in range(len(fm)):
        np.testing.assert_array_equal(got[i], np_max_mask(fm[i], valid[i]))
    assert not got[3].any()
    assert (got.sum(axis=(1, 2))[:3] <= fm.shape[-1]).all()


def test_max_mask_ties_follow_order():
    fm = relu_map(6, 5, 40, levels=2)
    np.testing.assert_array_equal(masks.max_mask(fm), np_max_mask(fm, np.ones(fm.shape[:2], bool)))
    np.testing.assert_array_equal(masks.max_mask(fm, order="F"), np_max_mask_reference(fm))
    assert (np.asarray(masks.max_mask(fm)) != np_max_mask_reference(fm)).any()


def test_sum_mask_matches_transcription(batch):
    fm, valid = batch
    got = np.asarray(masks.sum_mask(fm, valid))
    for i in range(len(fm)):
        np.testing.assert_array_equal(got[i], np_sum_mask(fm[i], valid[i]))
        if valid[i].any():
            assert got[i].sum() >= valid[i].sum() / 2


def test_sum_mask_ties_are_kept():
    fm = np.ones((4, 4, 3), np.float32)
    assert np.asarray(masks.sum_mask(fm)).all()


def test_single_map_batch_and_jit_agree(batch):
    fm, valid = batch
    for fn in (masks.max_mask, masks.sum_mask):
        full = np.asarray(fn(fm, valid))
        np.testing.assert_array_equal(fn(fm[0], valid[0]), full[0])
        jitted = jax.jit(lambda x, v, f=fn: f(x, v, validate=False))
        np.testing.assert_array_equal(jitted(fm, valid), full)
    np.testing.assert_array_equal(
        masks.max_mask(fm), np.stack([np_max_mask(f, np.ones(f.shape[:2], bool)) for f in fm])
    )


def test_masked_locals_layout(batch):
    fm, valid = batch
    m = np.asarray(masks.sum_mask(fm, valid))
    x, keep = masks.masked_locals(fm, m, valid)
    assert x.shape == (4, 63, 32) and keep.shape == (4, 63)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(x)[i][np.asarray(keep)[i]], fm[i][m[i] & valid[i]])
    x1, k1 = masks.masked_locals(fm[0], m[0])
    np.testing.assert_array_equal(x1, fm[0].reshape(63, 32))
    np.testing.assert_array_equal(k1, m[0].reshape(-1))


def test_sift_cells_floor_and_seed():
    pts = np.array([[0.0, 0.0], [255.9, 191.9], [127.4, 60.0], [-3.0, 400.0]])  # (x, y)
    floor = masks.sift_cells(pts, (192, 256), (6, 8))
    want = np.array(
        [
            [0, 0],
            [min(int(191.9 * 6 / 192), 5), min(int(255.9 * 8 / 256), 7)],
            [int(60 * 6 / 192), int(127.4 * 8 / 256)],
            [5, 0],
        ]
    )
    np.testing.assert_array_equal(floor, want)
    seed = masks.sift_cells(pts, (192, 256), (6, 8), round_mode="seed")
    for (x, y), (r, c) in zip(pts, seed, strict=True):  # eq. 1, 1-based, then 0-based + clamp
        assert r == np.clip(np.floor((y + 1) * 6 / 192 + 0.5) - 1, 0, 5)
        assert c == np.clip(np.floor((x + 1) * 8 / 256 + 0.5) - 1, 0, 7)


def _blob_image():
    img = np.zeros((96, 128, 3), np.float32)
    for cy, cx in ((20, 20), (70, 100), (48, 64)):
        yy, xx = np.mgrid[:96, :128]
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)[..., None]
    return np.clip(img, 0, 1)


def test_sift_mask_matches_keypoints():
    img = _blob_image()
    gray = cv2.cvtColor(np.rint(img * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    kps = cv2.SIFT_create().detect(gray, None)
    assert kps
    want = np.zeros((6, 8), bool)
    for kp in kps:
        x, y = kp.pt
        want[min(int(y * 6 / 96), 5), min(int(x * 8 / 128), 7)] = True
    got = masks.sift_mask(img, (6, 8))
    np.testing.assert_array_equal(got, want)
    dilated = masks.sift_mask(img, (6, 8), radius=1)
    ref = np.zeros_like(want)
    for r, c in zip(*np.nonzero(want), strict=True):
        ref[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
    np.testing.assert_array_equal(dilated, ref)
    np.testing.assert_array_equal(masks.sift_mask(np.stack([img, img]), (6, 8)), [want, want])
    assert not masks.sift_mask(np.full((64, 64, 3), 0.5, np.float32), (4, 4)).any()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: masks.max_mask(np.zeros((4, 4), np.float32)), "feature map"),
        (lambda: masks.max_mask(np.zeros((2, 4, 4, 3), np.int32)), "floating"),
        (lambda: masks.sum_mask(np.zeros((2, 4, 4, 3), np.float32), np.ones((2, 4, 5))), "valid"),
        (lambda: masks.max_mask(np.full((4, 4, 3), np.nan, np.float32)), "NaN"),
        (lambda: masks.sum_mask(np.full((4, 4, 3), np.inf, np.float32)), "NaN"),
        (lambda: masks.max_mask(np.zeros((4, 4, 3), np.float32), order="K"), "order"),
        (lambda: masks.masked_locals(np.zeros((4, 4, 3), np.float32), np.ones((3, 4))), "mask"),
        (lambda: masks.sift_mask(_blob_image(), (0, 4)), "grid_shape"),
        (lambda: masks.sift_mask(_blob_image(), (4, 4), radius=-1), "radius"),
        (lambda: masks.sift_mask(_blob_image(), (4, 4), round_mode="up"), "round_mode"),
        (lambda: masks.sift_mask(np.zeros((8, 8, 3), np.uint8), (4, 4)), "floating"),
        (lambda: masks.sift_mask(np.full((8, 8, 3), np.nan, np.float32), (4, 4)), "NaN"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
