"""jret.data.loader: decode, resize against a numpy reference, augmentation, prefetch order."""

import io
import math
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jret.data import loader as ld
from jret.data import synthetic as syn

tfds.disable_progress_bar()

TINY = syn.TINY_CONFIG


def jpeg(img: np.ndarray, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def random_image(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3)).astype(np.uint8)


def records(images: list[np.ndarray], fmt="PNG") -> ld.ImageRecords:
    """An in-memory stand-in for a TFDS data source (lossless PNG so pixels are known)."""
    return ld.ImageRecords(
        [
            {"index": i, "image": np.frombuffer(jpeg(im, fmt), np.uint8)}
            for i, im in enumerate(images)
        ]
    )


def triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` bilinear (triangle) weights with the support widened by the shrink
    factor: the antialiased bilinear filter, written out from its definition."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None] + 0.5 - centre[:, None]) / support)
    return w / w.sum(1, keepdims=True)


def reference_resize(img: np.ndarray, hw) -> np.ndarray:
    wy, wx = triangle_weights(img.shape[0], hw[0]), triangle_weights(img.shape[1], hw[1])
    return np.einsum("ij,jkc,lk->ilc", wy, img.astype(np.float64), wx)


@pytest.mark.parametrize(
    "hw, max_side, upscale, want",
    [
        ((768, 1024), 362, False, (272, 362)),
        ((1024, 768), 362, False, (362, 272)),
        ((100, 80), 362, False, (100, 80)),  # never enlarged
        ((100, 80), 362, True, (362, 290)),
        ((500, 3), 100, False, (100, 1)),  # at least one pixel
        ((37, 53), None, False, (37, 53)),
    ],
)
def test_resized_shape(hw, max_side, upscale, want):
    assert ld.resized_shape(hw, max_side, upscale) == want


@pytest.mark.parametrize(
    "hw, out", [((37, 53), (14, 20)), ((64, 48), (11, 8)), ((10, 12), (25, 30))]
)
def test_resize_matches_antialiased_bilinear_reference(hw, out):
    img = random_image(np.random.default_rng(0), *hw)
    got = ld.resize_image(img, out).astype(np.float64)
    assert got.shape == (*out, 3)
    # PIL rounds to 8 bits after each of its two passes: at most ~1 level from the exact value.
    np.testing.assert_allclose(got, reference_resize(img, out), atol=1.5)


def test_load_image_max_side_and_range():
    rng = np.random.default_rng(1)
    img = random_image(rng, 45, 60)
    data = jpeg(img, "PNG")
    full = ld.load_image(data)
    assert full.dtype == np.float32 and full.shape == (45, 60, 3)
    np.testing.assert_array_equal(full, img.astype(np.float32) / 255)
    small = ld.load_image(np.frombuffer(data, np.uint8), max_side=20)
    assert small.shape == (15, 20, 3) and 0 <= small.min() and small.max() <= 1
    np.testing.assert_allclose(small * 255, reference_resize(img, (15, 20)), atol=1.5)


def test_decode_bad_bytes():
    with pytest.raises(ValueError, match="cannot decode"):
        ld.decode_image(b"\x00garbage")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.8, 0.5)}, "scale"),
        ({"scale": (0.5, 1.5)}, "scale"),
        ({"ratio": (1.0,)}, "ratio"),
        ({"size": (0.5, 2.0)}, "size"),
        ({"size": "big"}, "size"),
    ],
)
def test_augment_bad_input(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ld.Augment(**kwargs)


def test_sample_crop_within_ranges():
    aug = ld.Augment(scale=(0.3, 0.8), ratio=(0.5, 2.0), size=(0.5, 1.0))
    rng = np.random.default_rng(2)
    h, w = 300, 400
    for _ in range(300):
        c = ld.sample_crop(rng, (h, w), 200, aug)
        assert 0 <= c.y0 and c.y0 + c.h <= h and 0 <= c.x0 and c.x0 + c.w <= w
        assert 100 <= c.side <= 200
        area = c.h * c.w / (h * w)
        assert area <= 0.8 + 0.01
        if c.h < h and c.w < w:  # not clipped to the image
            assert area >= 0.3 - 0.01
            r = (c.w / c.h) / (w / h)
            assert 0.5 - 0.02 <= r <= 2.0 + 0.02


def test_augmented_image_is_the_resized_crop():
    img = random_image(np.random.default_rng(3), 90, 120)
    aug = ld.Augment(scale=(0.2, 0.6), ratio=(0.75, 1.33), size=(0.6, 1.0))
    got = ld.load_image(jpeg(img, "PNG"), max_side=64, augment=aug, rng=np.random.default_rng(7))
    c = ld.sample_crop(np.random.default_rng(7), (90, 120), 64, aug)
    crop = img[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w]
    f = c.side / max(c.h, c.w)
    hw = (max(1, round(c.h * f)), max(1, round(c.w * f)))
    assert got.shape == (*hw, 3) and max(hw) == c.side
    np.testing.assert_allclose(got * 255, reference_resize(crop, hw), atol=1.5)


def test_identity_augment_equals_plain_load():
    data = jpeg(random_image(np.random.default_rng(4), 50, 70), "PNG")
    aug = ld.Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), size=(1.0, 1.0))
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(ld.load_image(data, 35, aug, rng), ld.load_image(data, 35))
    with pytest.raises(ValueError, match="rng"):
        ld.load_image(data, 35, aug)


def test_iterate_images_order_and_determinism():
    rng = np.random.default_rng(5)
    imgs = [
        random_image(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60))) for _ in range(9)
    ]
    src = records(imgs)
    groups = [[3, 1, 4], [1, 5], [8, 2, 6, 0], [7]]
    out = list(ld.iterate_images(src, groups, max_side=24, num_threads=3, prefetch=2))
    assert [len(b) for b in out] == [len(g) for g in groups]
    for batch, group in zip(out, groups, strict=True):
        for got, i in zip(batch, group, strict=True):
            np.testing.assert_array_equal(got, ld.load_image(jpeg(imgs[i], "PNG"), 24))
    aug = ld.Augment()
    runs = [
        list(ld.iterate_images(src, groups, 24, aug, seed=(9, 1), num_threads=t, prefetch=p))
        for t, p in ((1, 1), (4, 3))
    ]
    for a, b in zip(*runs, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    first = runs[0][0][0]
    want = ld.load_image(jpeg(imgs[3], "PNG"), 24, aug, ld.image_rng((9, 1), 0, 0))
    np.testing.assert_array_equal(first, want)
    other = next(ld.iterate_images(src, groups, 24, aug, seed=(9, 2)))
    assert any(
        x.shape != y.shape or not np.array_equal(x, y)
        for x, y in zip(other, runs[0][0], strict=True)
    )


def test_iterate_images_numpy_rows_and_bad_input():
    src = records([random_image(np.random.default_rng(6), 16, 16) for _ in range(4)])
    tuples = np.array([[0, 1, 2], [3, 2, 1]])
    assert [len(b) for b in ld.iterate_images(src, tuples)] == [3, 3]
    with pytest.raises(ValueError, match=r"groups\[1\]"):
        list(ld.iterate_images(src, [[0], [4]]))
    with pytest.raises(ValueError, match="num_threads"):
        list(ld.iterate_images(src, [[0]], num_threads=0))
    with pytest.raises(ValueError, match="max_side"):
        list(ld.iterate_images(src, [[0]], max_side=-3))
    with pytest.raises(IndexError):
        src.image_bytes(4)


def test_image_view_decodes_the_chosen_images_on_access():
    rng = np.random.default_rng(7)
    imgs = [random_image(rng, 6 + i, 9) for i in range(5)]
    view = records(imgs).view([3, 0, 3])
    assert len(view) == 3
    for k, i in enumerate([3, 0, 3]):
        np.testing.assert_array_equal(view[k], imgs[i].astype(np.float32) / 255)
    with pytest.raises(IndexError):
        view[3]


def test_record_order_is_checked():
    data = np.frombuffer(jpeg(np.zeros((4, 4, 3), np.uint8), "PNG"), np.uint8)
    src = ld.ImageRecords([{"index": 1, "image": data}, {"index": 0, "image": data}])
    with pytest.raises(ValueError, match="corrupt"):
        src.image_bytes(0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, syn.generate(root, "tiny", seed=5, config=TINY)


def test_load_train_source(synth, tmp_path):
    root, ds_dir = synth
    with open(syn.train_pickle_path(root, "tiny"), "rb") as f:
        source = pickle.load(f)
    for split in ("train", "val"):
        src = ld.load_train_source("synthetic", tmp_path, split, manual_dir=ds_dir)
        want = source[split]
        assert (src.name, src.split, len(src)) == ("synthetic", split, len(want["cids"]))
        for name in ("cluster", "qidxs", "pidxs"):
            arr = getattr(src, name)
            assert arr.dtype == np.int64
            np.testing.assert_array_equal(arr, want[name])
        i = len(src) - 1
        path = syn.train_image_path(root, "tiny", want["cids"][i])
        np.testing.assert_array_equal(
            src.images.image(i), ld.decode_image(path.read_bytes()).astype(np.float32) / 255
        )
        big = src.images.image(i, max_side=48)
        assert max(big.shape[:2]) == 48
    again = ld.load_train_source("synthetic", tmp_path, "val")  # prepared: no manual dir needed
    assert len(again) == len(source["val"]["cids"])
    with pytest.raises(ValueError, match="split"):
        ld.load_train_source("synthetic", tmp_path, "test")
    with pytest.raises(ValueError, match="name"):
        ld.load_train_source("oxford", tmp_path)


def test_load_revisited_source(synth, tmp_path):
    root, ds_dir = synth
    with open(ds_dir / "gnd_tiny.pkl", "rb") as f:
        gnd = pickle.load(f)
    src = ld.load_revisited_source("tiny", tmp_path, manual_dir=root)
    assert src.imlist == gnd["imlist"] and src.qimlist == gnd["qimlist"]
    assert len(src.database) == len(gnd["imlist"]) and len(src.queries) == len(gnd["qimlist"])
    q = 2
    assert src.query_bbox(q) == tuple(float(v) for v in gnd["gnd"][q]["bbx"])
    assert src.gnd[q]["hard"] == list(gnd["gnd"][q]["hard"])
    raw = (ds_dir / "jpg" / f"{gnd['qimlist'][q]}.jpg").read_bytes()
    assert src.queries.image_bytes(q) == raw
    assert math.isclose(
        src.database.image(5).mean(),
        ld.load_image((ds_dir / "jpg" / f"{gnd['imlist'][5]}.jpg").read_bytes()).mean(),
    )
