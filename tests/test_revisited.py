"""Tests for jret.data.revisited on a tiny data set written to disk."""

import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFile

from jret.data.revisited import (
    RevisitedDataset,
    crop_query,
    gnd_path,
    load_gnd,
    load_image,
    load_r1m_list,
    load_revisited,
    validate_gnd,
    write_gnd,
)

IMLIST = ["db_a", "db_b", "db_c", "db_d"]
QIMLIST = ["q_0", "q_1"]
GND = [
    {"bbx": [1.2, 2.0, 9.7, 7.5], "easy": [0], "hard": [1, 2], "junk": [3]},
    {"bbx": np.array([0.0, 0.0, 4.0, 3.0]), "easy": np.array([2]), "hard": [], "junk": []},
]


def _save_jpeg(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture
def root(tmp_path):
    """A revisitop-layout data set 'tinyset' with 4 database images and 2 queries."""
    jpg = tmp_path / "tinyset" / "jpg"
    jpg.mkdir(parents=True)
    for i, name in enumerate(IMLIST + QIMLIST):
        _save_jpeg(jpg / f"{name}.jpg", 12 + i, 16, seed=i)
    write_gnd(gnd_path(tmp_path, "tinyset"), IMLIST, QIMLIST, GND)
    return tmp_path


def _write_raw(root, name, cfg):
    path = gnd_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(cfg, f)
    return path


def test_load_revisited_round_trip(root):
    ds = load_revisited(root, "tinyset", check_images=True)
    assert isinstance(ds, RevisitedDataset) and ds.protocol == "revisited"
    assert ds.imlist == IMLIST and ds.qimlist == QIMLIST
    assert ds.gnd[0]["hard"] == [1, 2] and ds.gnd[1]["easy"] == [2] and ds.gnd[1]["hard"] == []
    assert ds.image_path(2) == root / "tinyset" / "jpg" / "db_c.jpg"
    assert ds.query_path(1) == root / "tinyset" / "jpg" / "q_1.jpg"
    assert ds.query_bbox(0) == (1.2, 2.0, 9.7, 7.5)
    # the pickle holds plain Python types (loadable without numpy)
    raw = load_gnd(root, "tinyset")
    assert type(raw["gnd"][1]["easy"][0]) is int and type(raw["gnd"][1]["bbx"][0]) is float
    # query_image = crop of the full query image: x 1.2..9.7 -> 1..10, y 2..7.5 -> 2..8 (round half
    # to even: 7.5 -> 8)
    full = load_image(ds.query_path(0))
    np.testing.assert_array_equal(ds.query_image(0), full[2:8, 1:10])


def test_write_gnd_extra_entries(tmp_path):
    path = write_gnd(gnd_path(tmp_path, "s"), IMLIST, QIMLIST, GND, extra={"meta": {"seed": 3}})
    assert load_gnd(tmp_path, "s")["meta"] == {"seed": 3}
    assert load_revisited(tmp_path, "s").imlist == IMLIST
    with pytest.raises(ValueError, match="reserved"):
        write_gnd(path, IMLIST, QIMLIST, GND, extra={"gnd": []})


def test_old_protocol_layout(tmp_path):
    gnd = [{"bbx": [0, 0, 2, 2], "ok": [0, 1], "junk": [2]}]
    write_gnd(gnd_path(tmp_path, "oxford5k"), ["a", "b", "c"], ["a"], gnd)
    ds = load_revisited(tmp_path, "oxford5k")
    assert ds.protocol == "old" and ds.gnd[0]["ok"] == [0, 1]
    # an old-style name requires ok/junk
    revisited_gnd = [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}]
    _write_raw(tmp_path, "paris6k", {"imlist": ["a"], "qimlist": ["a"], "gnd": revisited_gnd})
    with pytest.raises(ValueError, match=r"gnd\[0\]: missing key 'ok'"):
        load_revisited(tmp_path, "paris6k")


def test_write_gnd_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = write_gnd(tmp_path / "x" / "gnd_x.pkl", IMLIST, QIMLIST, GND)
    with pytest.raises(ValueError, match=r"gnd\[0\]\['easy'\]"):
        write_gnd(path, IMLIST, QIMLIST, [{**GND[0], "easy": [9]}, GND[1]])
    assert sorted(p.name for p in path.parent.iterdir()) == ["gnd_x.pkl"]
    assert load_gnd(tmp_path, "x")["gnd"][0]["easy"] == [0]  # the earlier file is untouched


def test_missing_directory_and_pickle(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_revisited(tmp_path, "nothere")
    (tmp_path / "emptyset").mkdir()
    with pytest.raises(FileNotFoundError, match="gnd_emptyset.pkl"):
        load_revisited(tmp_path, "emptyset")


def test_unreadable_pickle(tmp_path):
    path = gnd_path(tmp_path, "broken")
    path.parent.mkdir()
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="gnd_broken.pkl"):
        load_revisited(tmp_path, "broken")
    _write_raw(tmp_path, "alist", [1, 2, 3])
    with pytest.raises(ValueError, match="expected a pickled dict"):
        load_revisited(tmp_path, "alist")


def _cfg(gnd):
    return {"imlist": IMLIST, "qimlist": QIMLIST, "gnd": gnd}


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"imlist": IMLIST, "gnd": GND}, "missing key 'qimlist'"),
        (_cfg(GND[:1]), "expected 2 entries"),
        (_cfg([GND[0], {"bbx": [0, 0, 1, 1]}]), r"gnd\[1\]: missing key 'easy'"),
        (_cfg([GND[0], {**GND[1], "hard": None}]), r"gnd\[1\]\['hard'\]: expected a 1-D"),
        (
            _cfg([{**GND[0], "junk": [4]}, GND[1]]),
            r"gnd\[0\]\['junk'\]: expected indices in \[0, 4\)",
        ),
        (_cfg([{**GND[0], "hard": [-1]}, GND[1]]), r"gnd\[0\]\['hard'\]: expected indices"),
        (_cfg([{**GND[0], "easy": [0.5]}, GND[1]]), r"gnd\[0\]\['easy'\]: expected a 1-D list"),
        (_cfg([GND[0], {**GND[1], "bbx": [4, 0, 1, 5]}]), r"gnd\[1\]\['bbx'\]: expected x1 < x2"),
        (_cfg([GND[0], {**GND[1], "bbx": [0, 1, 2]}]), r"gnd\[1\]\['bbx'\]: expected 4 finite"),
        (_cfg([GND[0], "easy"]), r"gnd\[1\]: expected a dict"),
    ],
)
def test_load_revisited_bad_ground_truth(tmp_path, cfg, match):
    _write_raw(tmp_path, "bad", cfg)
    with pytest.raises(ValueError, match=match):
        load_revisited(tmp_path, "bad")
    if "gnd" in cfg and "qimlist" in cfg:
        load_revisited(tmp_path, "bad", validate=False)  # the same file loads unchecked


def test_check_images_reports_missing_file(root):
    (root / "tinyset" / "jpg" / "db_b.jpg").unlink()
    load_revisited(root, "tinyset")  # not checked by default
    with pytest.raises(FileNotFoundError, match="db_b.jpg"):
        load_revisited(root, "tinyset", check_images=True)


def test_validate_gnd_empty_ok():
    validate_gnd(["a"], [], [])


# ---------------------------------------------------------------------------------------------
# Images and crops


def test_load_image_png_grayscale_and_range(tmp_path):
    arr = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7) * 3
    Image.fromarray(arr).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.dtype == np.float32 and img.shape == (12, 7, 3)
    np.testing.assert_allclose(img[..., 1], arr / 255.0, atol=1e-7)
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_load_image_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"\x00\x01 this is not an image")
    with pytest.raises(ValueError, match="garbage.jpg"):
        load_image(tmp_path / "garbage.jpg")
    _save_jpeg(tmp_path / "full.jpg", 64, 64, seed=0)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def _grid(h=10, w=12):
    """Pixel (y, x) holds (y, x, 0) so a crop can be read back."""
    y, x = np.mgrid[:h, :w]
    return np.stack([y, x, np.zeros_like(y)], axis=-1).astype(np.float32)


def test_crop_python_mode_is_half_open_and_rounded():
    img = _grid()
    # round half to even, as PIL's Image.crop: 1.5 -> 2, 2.5 -> 2, 6.4 -> 6, 7.6 -> 8
    out = crop_query(img, (1.5, 2.5, 6.4, 7.6))
    assert out.shape == (6, 4, 3)  # rows 2..7, cols 2..5
    assert out[0, 0, :2].tolist() == [2, 2] and out[-1, -1, :2].tolist() == [7, 5]


def test_crop_python_mode_matches_pil():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    box = (3.4, 2.5, 17.5, 15.6)
    pil = np.asarray(Image.fromarray(arr).crop(box), dtype=np.float32)
    np.testing.assert_array_equal(crop_query(arr.astype(np.float32), box), pil)


def test_crop_matlab_mode_keeps_edge_pixel():
    img = _grid()
    # MATLAB crop_qim: uint32(bbx + 1) rounds half up, inclusive end: x 1.5 -> 2 .. 6.4 -> 6,
    # y 2.5 -> 3 .. 7.6 -> 8 -> rows 3..8, cols 2..6
    out = crop_query(img, (1.5, 2.5, 6.4, 7.6), crop_mode="matlab")
    assert out.shape == (6, 5, 3)
    assert out[0, 0, :2].tolist() == [3, 2] and out[-1, -1, :2].tolist() == [8, 6]
    # integer box: python gives (y1 - y0, x1 - x0), matlab one more row and column
    assert crop_query(img, (2, 3, 5, 7)).shape == (4, 3, 3)
    assert crop_query(img, (2, 3, 5, 7), crop_mode="matlab").shape == (5, 4, 3)


def test_crop_clamps_to_image_and_accepts_jax_and_2d():
    img = _grid()
    out = crop_query(img, (-3.0, -2.0, 50.0, 40.0))
    np.testing.assert_array_equal(out, img)
    assert crop_query(img, (8, 6, 11.9, 9.9), crop_mode="matlab").shape == (4, 4, 3)
    out = crop_query(jnp.asarray(img), (1, 1, 3, 4))
    assert isinstance(out, jnp.ndarray) and out.shape == (3, 2, 3)
    assert crop_query(img[..., 0], (1, 1, 3, 4)).shape == (3, 2)


@pytest.mark.parametrize(
    "img, bbx, kwargs, match",
    [
        (_grid(), (20, 0, 30, 5), {}, "empty crop"),
        (_grid(), (1.2, 0, 1.4, 5), {}, "empty crop"),
        (_grid(), (5, 0, 2, 5), {}, "x1 < x2"),
        (_grid(), (0, 0, 2), {}, "4 finite"),
        (_grid(), (0, 0, np.nan, 2), {}, "4 finite"),
        (_grid(), (0, 0, 2, 2), {"crop_mode": "opencv"}, "crop_mode"),
        (np.zeros(5), (0, 0, 2, 2), {}, "img"),
    ],
)
def test_crop_bad_input(img, bbx, kwargs, match):
    with pytest.raises(ValueError, match=match):
        crop_query(img, bbx, **kwargs)


# ---------------------------------------------------------------------------------------------
# R1M distractor list


def test_load_r1m_list(tmp_path):
    d = tmp_path / "revisitop1m"
    d.mkdir()
    (d / "revisitop1m.txt").write_text("0/00/a.jpg\n0/01/b.jpg\n\n1/00/c.jpg\n")
    r1m = load_r1m_list(tmp_path)
    assert len(r1m) == 3 and r1m.names[2] == "1/00/c.jpg"
    assert r1m.image_path(1) == d / "jpg" / "0/01/b.jpg"


def test_load_r1m_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="revisitop1m.txt"):
        load_r1m_list(tmp_path)
    (tmp_path / "revisitop1m").mkdir()
    (tmp_path / "revisitop1m" / "revisitop1m.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_r1m_list(tmp_path)
