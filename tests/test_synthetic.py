"""jret.data.synthetic: layout, labels by construction, determinism, caching, training split."""

import dataclasses
import hashlib
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from jret.data import synthetic as syn
from jret.data.revisited import load_revisited

TINY = syn.TINY_CONFIG


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, syn.generate(root, "tiny", seed=3, config=TINY)


def read_gnd(path, name="tiny"):
    with open(path / f"gnd_{name}.pkl", "rb") as f:
        return pickle.load(f)


def file_digests(path):
    """SHA-1 of every file under ``path`` (relative name -> digest)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha1(f.read()).hexdigest()
    return out


def reference_label(visible, scale, factors, c):
    """The label rule of the module docstring, written out independently."""
    if visible < c.junk_visible or scale < c.extreme_scale:
        return "junk"
    assert visible >= c.hard_min_visible
    if not factors and scale >= c.easy_scale[0] and visible >= c.easy_min_visible:
        return "easy"
    return "hard"


def test_layout_loads_with_load_revisited(tiny):
    root, path = tiny
    assert path == root / "tiny"
    ds = load_revisited(root, "tiny", check_images=True)
    assert len(ds.imlist) == TINY.n_db and len(ds.qimlist) == TINY.n_queries
    sizes = {Image.open(ds.image_path(i)).size for i in range(len(ds.imlist))}
    assert sizes <= {(96, 72), (72, 96)}
    assert ds.query_image(0).shape[-1] == 3


def test_every_query_has_easy_hard_junk_disjoint_valid(tiny):
    ds = load_revisited(tiny[0], "tiny")
    for g in ds.gnd:
        easy, hard, junk = (set(g[k]) for k in ("easy", "hard", "junk"))
        assert easy and hard and junk
        assert not (easy & hard or easy & junk or hard & junk)
        assert all(0 <= i < len(ds.imlist) for i in easy | hard | junk)
        assert (len(easy), len(hard), len(junk)) == (TINY.n_easy, TINY.n_hard, TINY.n_junk)


def test_queries_not_in_database(tiny):
    root, path = tiny
    ds = load_revisited(root, "tiny")
    assert not set(ds.qimlist) & set(ds.imlist)
    digest = file_digests(path / "jpg")
    queries = {digest[f"{n}.jpg"] for n in ds.qimlist}
    assert len(queries) == len(ds.qimlist)
    assert not queries & {digest[f"{n}.jpg"] for n in ds.imlist}


def test_bbx_within_image_and_covers_landmark(tiny):
    root, path = tiny
    ds = load_revisited(root, "tiny")
    meta = read_gnd(path)["meta"]
    for q, g in enumerate(ds.gnd):
        x1, y1, x2, y2 = g["bbx"]
        w, h = Image.open(ds.query_path(q)).size
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) * (y2 - y1) >= 0.1 * w * h
        assert meta["query_visible"][q] >= 0.9
    assert sorted(set(meta["query_landmark"])) == list(range(TINY.n_landmarks))


def test_labels_follow_visible_fraction_and_transform(tiny):
    root, path = tiny
    ds = load_revisited(root, "tiny")
    meta = read_gnd(path)["meta"]
    landmark = np.array(meta["landmark"])
    for i, lm in enumerate(landmark):
        label, visible, scale = meta["label"][i], meta["visible"][i], meta["scale"][i]
        if lm < 0:
            assert label == "negative" and visible == 0.0
            continue
        assert label == reference_label(visible, scale, meta["factors"][i], TINY)
        if label == "hard" and not meta["factors"][i]:
            assert visible <= TINY.hard_visible[1]
        assert 0.0 < visible <= 1.0 + 1e-6
        assert 0.0 < meta["area"][i] <= 1.0
    for q, g in enumerate(ds.gnd):
        same = landmark == meta["query_landmark"][q]
        for kind in ("easy", "hard", "junk"):
            want = [i for i in np.flatnonzero(same) if meta["label"][i] == kind]
            assert g[kind] == want
    assert (landmark < 0).sum() == TINY.n_db - TINY.n_landmarks * 6


def test_visible_fraction_of_a_half_cut_and_occluded_object():
    """Geometry check: an object half outside the frame, then a quarter of it covered."""
    canvas = np.zeros((40, 80, 3), np.float32)
    obj = np.ones((32, 32, 4), np.float32)
    quad = np.array([[-20.0, 0.0], [20.0, 0.0], [20.0, 40.0], [-20.0, 40.0]])
    hom, warped, alpha = syn._paste(canvas, obj, quad)
    unoccluded = np.ones(canvas.shape[:2], np.float32)
    assert syn._visible_fraction(hom, warped, unoccluded) == pytest.approx(0.5, abs=0.03)
    assert canvas[:, :20].mean() == pytest.approx(1.0, abs=0.05) and canvas[:, 22:].max() == 0
    unoccluded[:20] = 0
    assert syn._visible_fraction(hom, warped, unoccluded) == pytest.approx(0.25, abs=0.03)


def test_same_seed_identical_other_seed_different(tiny, tmp_path):
    _, path = tiny
    again = syn.generate(tmp_path, "tiny", seed=3, config=TINY)
    first, second = file_digests(path), file_digests(again)
    assert first == second
    assert read_gnd(path) == read_gnd(again)
    other = file_digests(syn.generate(tmp_path, "other", seed=4, config=TINY))
    assert read_gnd(path)["gnd"] != read_gnd(tmp_path / "other", "other")["gnd"]
    same_names = [k for k in first if k.startswith("jpg") and k in other]
    assert same_names and all(first[k] != other[k] for k in same_names)


def test_cache_reuse_and_regeneration(tmp_path):
    path = syn.generate(tmp_path, "c", seed=1, config=TINY)
    gnd_file = path / "gnd_c.pkl"
    before = (path.stat().st_ino, gnd_file.stat().st_ino, gnd_file.stat().st_mtime_ns)
    digests = file_digests(path)
    time.sleep(0.01)
    assert syn.generate(tmp_path, "c", seed=1, config=TINY) == path
    assert (path.stat().st_ino, gnd_file.stat().st_ino, gnd_file.stat().st_mtime_ns) == before
    changed = dataclasses.replace(TINY, jpeg_quality=70)
    syn.generate(tmp_path, "c", seed=1, config=changed)
    regenerated = file_digests(path)
    assert gnd_file.stat().st_ino != before[1]
    assert regenerated.keys() == digests.keys()
    assert regenerated["synthetic.json"] != digests["synthetic.json"]
    assert regenerated["jpg/db_00000.jpg"] != digests["jpg/db_00000.jpg"]
    syn.generate(tmp_path, "c", seed=2, config=changed)
    assert file_digests(path)["gnd_c.pkl"] != regenerated["gnd_c.pkl"]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directories left


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        syn.generate(tmp_path, "mine", config=TINY)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"


def test_config_key():
    key = syn.config_key(TINY, "a", 0)
    assert key == syn.config_key(dataclasses.replace(TINY), "a", 0)
    assert (
        len(
            {
                key,
                syn.config_key(TINY, "a", 1),
                syn.config_key(TINY, "b", 0),
                syn.config_key(dataclasses.replace(TINY, n_db=61), "a", 0),
            }
        )
        == 4
    )


def test_config_accepts_lists_for_ranges():
    listed = dataclasses.replace(TINY, easy_scale=[0.5, 0.85], image_size=[96, 72])
    assert listed == TINY and isinstance(listed.easy_scale, tuple)


def photo_boxes(tags):
    out = {}
    for tag in tags:
        kind, *rest = tag.split(":")
        if kind == "photo":
            out.setdefault(rest[0], []).append(tuple(int(v) for v in rest[1:]))
    return out


def overlap(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_training_split(tiny):
    root, path = tiny
    db = syn.load_train(root, "tiny")
    assert syn.train_pickle_path(root, "tiny") == path / "train" / "tiny-train.pkl"
    per = TINY.train_images_per_landmark
    seen = set()
    for split, n in (("train", TINY.n_train_landmarks), ("val", TINY.n_val_landmarks)):
        s = db[split]
        assert len(s["cids"]) == len(s["cluster"]) == n * per
        assert len(s["qidxs"]) == len(s["pidxs"]) == n * TINY.train_pairs_per_landmark
        cluster = np.array(s["cluster"])
        assert len(set(cluster)) == n and not seen & set(cluster)
        seen |= set(cluster)
        for q, p in zip(s["qidxs"], s["pidxs"], strict=True):
            assert q != p and cluster[q] == cluster[p]
        for cid in s["cids"]:
            f = syn.train_image_path(root, "tiny", cid)
            assert f.parent.relative_to(path / "train" / "ims").parts == (
                cid[-2:],
                cid[-4:-2],
                cid[-6:-4],
            )
            assert Image.open(f).format == "JPEG"
        assert all(v >= TINY.hard_min_visible for v in s["visible"])
    train_tags, test_tags = db["meta"]["landmarks"], read_gnd(path)["meta"]["landmarks"]
    assert len(train_tags) == len(seen) and not set(train_tags) & set(test_tags)
    test_boxes, train_boxes = photo_boxes(test_tags), photo_boxes(train_tags)
    for src, boxes in test_boxes.items():
        assert not any(overlap(a, b) for a in boxes for b in train_boxes.get(src, []))


def test_test_train_and_clutter_objects_are_distinct():
    assets = syn._build_assets(3, TINY)
    assert len(assets.test) == TINY.n_landmarks
    assert len(assets.train) == TINY.n_train_landmarks + TINY.n_val_landmarks
    groups = (assets.test, assets.train, assets.clutter)
    for a_idx, group_a in enumerate(groups):
        for group_b in groups[a_idx + 1 :]:
            for a in group_a:
                for b in group_b:
                    assert a.shape != b.shape or np.abs(a - b).mean() > 0.02


def test_contact_sheet(tiny, tmp_path):
    root, _ = tiny
    out = syn.contact_sheet(
        root, "tiny", n_queries=2, per_kind=2, path=tmp_path / "s.png", thumb=48
    )
    with Image.open(out) as im:
        assert im.size == (54 * 7, 66 * 2)
    assert out.stat().st_size < 500_000
    with pytest.raises(ValueError, match="per_kind"):
        syn.contact_sheet(root, "tiny", per_kind=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_landmarks", 0),
        ("n_db", 40),
        ("n_queries", 1.5),
        ("image_size", (64, 96)),
        ("image_size", (96,)),
        ("portrait_fraction", 1.5),
        ("easy_scale", (0.8, 0.5)),
        ("hard_scale", (0.16, 0.5)),
        ("hard_rotation", (5.0, 60.0)),
        ("hard_factors", (0, 1)),
        ("junk_visible", 0.35),
        ("jpeg_quality", 0),
        ("train_pairs_per_landmark", 9),
        ("train_images_per_landmark", 1),
        ("clutter_scale", (0.0, 0.3)),
    ],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"config.{field}"):
        dataclasses.replace(TINY, **{field: value})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a/b"}, "name"),
        ({"name": ""}, "name"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"config": {"n_db": 10}}, "config"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.generate(tmp_path, **{"config": TINY, **kwargs})


@pytest.mark.slow
def test_default_benchmark(tmp_path):
    start = time.perf_counter()
    path = syn.generate(tmp_path, "synth")
    elapsed = time.perf_counter() - start
    ds = load_revisited(tmp_path, "synth", check_images=True)
    assert (len(ds.imlist), len(ds.qimlist)) == (1000, 70)
    assert all(g["easy"] and g["hard"] and g["junk"] for g in ds.gnd)
    assert len(syn.load_train(tmp_path, "synth")["train"]["cids"]) == 40 * 16
    assert path.is_dir() and elapsed < 120
