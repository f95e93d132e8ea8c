"""DSM feature detection (jret.dsm_features) against brute-force numpy references."""

import itertools

import cv2
import jax
import numpy as np
import pytest

from jret import dsm_features as df
from jret.extract import prepare_image
from jret.models import RetrievalNet, init_retrieval_net

RNG = np.random.default_rng(5)


def sparse_map(h, w, c, density=0.15, rng=RNG):
    return np.float32(rng.random((h, w, c)) * (rng.random((h, w, c)) < density) * 5)


# ---------------------------------------------------------------------------------------------
# local maxima


def np_local_maxima(a, thr=0.0):
    h, w, c = a.shape
    out = np.zeros(a.shape, bool)
    for y, x, k in itertools.product(range(h), range(w), range(c)):
        win = a[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2, k]
        out[y, x, k] = a[y, x, k] > thr and a[y, x, k] >= win.max()
    return out


def np_peak_ellipse(a, y, x, k, r):
    """Moments of the flood fill from the peak through cells >= half the peak, inside the
    (2r+1)^2 window and the map; cells are unit squares."""
    h, w, _ = a.shape

    def ok(yy, xx):
        inside = abs(yy - y) <= r and abs(xx - x) <= r and 0 <= yy < h and 0 <= xx < w
        return inside and a[yy, xx, k] >= 0.5 * a[y, x, k]

    pts, todo = {(x, y)}, [(x, y)]
    while todo:
        cx, cy = todo.pop()
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            nb = (cx + dx, cy + dy)
            if nb not in pts and ok(nb[1], nb[0]):
                pts.add(nb)
                todo.append(nb)
    pts = np.array(sorted(pts), np.float64)
    mu = pts.mean(0)
    sigma = (pts - mu).T @ (pts - mu) / len(pts) + np.eye(2) / 12
    return mu, sigma


def test_local_maxima_vs_numpy():
    a = sparse_map(9, 11, 6, density=0.4)
    a[2, 3, 0] = a[2, 4, 0] = 7.0  # a plateau: both cells count
    np.testing.assert_array_equal(df.local_maxima(a), np_local_maxima(a))
    np.testing.assert_array_equal(df.local_maxima(a, 2.0), np_local_maxima(a, 2.0))


@pytest.mark.parametrize("r", [1, 2])
def test_peak_ellipses_vs_numpy(r):
    a = sparse_map(8, 10, 3, density=0.7)
    ys, xs, cs = np.nonzero(np_local_maxima(a))
    mu, sigma = df.peak_ellipses(a, ys, xs, cs, r)
    for p in range(len(ys)):
        mu_ref, s_ref = np_peak_ellipse(a, ys[p], xs[p], cs[p], r)
        np.testing.assert_allclose(mu[p], mu_ref, atol=1e-5)
        np.testing.assert_allclose(sigma[p], s_ref, atol=1e-5)


def np_nms(boxes, strength, mask, thr, max_keep=None):
    order = [i for i in np.argsort(-strength, kind="stable") if mask[i]]
    keep = []
    for i in order:
        if max_keep is not None and len(keep) >= max_keep:
            break
        ok = True
        for j in keep:
            x0, y0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x1, y1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(x1 - x0, 0) * max(y1 - y0, 0)
            union = (
                np.prod(boxes[i, 2:] - boxes[i, :2]) + np.prod(boxes[j, 2:] - boxes[j, :2]) - inter
            )
            ok &= inter / union <= thr
        if ok:
            keep.append(i)
    out = np.zeros(len(boxes), bool)
    out[keep] = True
    return out


@pytest.mark.parametrize("max_keep", [None, 7])
def test_nms_vs_numpy(max_keep):
    n = 120
    lo = RNG.uniform(0, 20, (n, 2))
    boxes = np.float32(np.concatenate([lo, lo + RNG.uniform(0.5, 4, (n, 2))], 1))
    strength = np.float32(RNG.random(n))
    mask = RNG.random(n) < 0.9
    keep = df.nms(boxes, strength, mask, 0.2, max_keep=max_keep)
    np.testing.assert_array_equal(keep, np_nms(boxes, strength, mask, 0.2, max_keep))


def test_ellipse_boxes():
    sigma = np.float32([[[4.0, 1.0], [1.0, 1.0]]])
    np.testing.assert_allclose(df.ellipse_boxes(np.float32([[5, 6]]), sigma), [[3, 5, 7, 7]])
    np.testing.assert_allclose(df.ellipse_boxes(np.float32([[5, 6]]), sigma, 2.0), [[1, 4, 9, 8]])


def test_channel_caps_vs_numpy():
    p, c = 200, 7
    ch = RNG.integers(0, c, p).astype(np.int32)
    st = np.float32(RNG.random(p))
    mask = RNG.random(p) < 0.8
    keep = np.asarray(df.channel_caps(ch, st, mask, c, 5, 25))
    counts = np.bincount(ch[mask], minlength=c)
    ref = np.zeros(p, bool)
    for k in range(c):
        if counts[k] > 25:
            continue
        idx = [i for i in np.argsort(-st, kind="stable") if mask[i] and ch[i] == k][:5]
        ref[idx] = True
    np.testing.assert_array_equal(keep, ref)


def np_maxima_detect(maps, database, m, per_channel, burst, r=2, nms_iou=0.2, k_box=1.0):
    feats = []
    for s, a in enumerate(maps):
        peaks = np_local_maxima(a)
        cand = []
        for k in range(a.shape[2]):
            ys, xs = np.nonzero(peaks[:, :, k])
            if len(ys) > burst:
                continue
            vals = a[ys, xs, k]
            for o in np.argsort(-vals, kind="stable")[:per_channel]:
                mu, sg = np_peak_ellipse(a, ys[o], xs[o], k, r)
                cand.append((vals[o], k, s, mu, sg))
        if database:
            st = np.array([f[0] for f in cand])
            boxes = np.array(
                [
                    np.concatenate(
                        [
                            f[3] - k_box * np.sqrt(np.diag(f[4])),
                            f[3] + k_box * np.sqrt(np.diag(f[4])),
                        ]
                    )
                    for f in cand
                ]
            )
            keep = np_nms(boxes, st, np.ones(len(cand), bool), nms_iou)
            cand = [f for f, kp in zip(cand, keep, strict=True) if kp]
        feats += cand
    feats.sort(key=lambda f: -f[0])
    return feats[:m]


@pytest.mark.parametrize("database,box_scale", [(False, 1.0), (True, 1.0), (True, 2.0)])
def test_maxima_detect_vs_numpy_pipeline(database, box_scale):
    rng = np.random.default_rng(11)
    maps = [sparse_map(10, 12, 9, 0.3, rng), sparse_map(7, 8, 9, 0.3, rng)]
    maps[0][:, :, 4] = 1.0  # a plateau: 120 peaks, a bursty channel
    got = df.detect(maps, "maxima", database=database, max_features=60, box_scale=box_scale)
    ref = np_maxima_detect(maps, database, 60, 10 if database else 20, 36, k_box=box_scale)
    n = int(got.mask.sum())
    assert n == len(ref)
    np.testing.assert_allclose(np.asarray(got.strength)[:n], [f[0] for f in ref], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.channel)[:n], [f[1] for f in ref])
    np.testing.assert_array_equal(np.asarray(got.scale)[:n], [f[2] for f in ref])
    np.testing.assert_allclose(np.asarray(got.mu)[:n], [f[3] for f in ref], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.sigma)[:n], [f[4] for f in ref], atol=1e-5)
    assert not np.asarray(got.mask)[n:].any()


def grid_peaks_map(counts, h=16, w=24, seed=0):
    """Channel k holds counts[k] isolated peaks of distinct values on a spacing-2 grid."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, len(counts)), np.float32)
    cells = [(y, x) for y in range(0, h, 2) for x in range(0, w, 2)]
    for k, n in enumerate(counts):
        for i in rng.permutation(len(cells))[:n]:
            a[cells[i][0], cells[i][1], k] = 1 + rng.random()
    return a


@pytest.mark.parametrize(
    "rule,database,expected",
    [
        ("reference", False, [0, 20, 15]),
        ("reference", True, [0, 10, 10]),
        ("seed", False, [0, 0, 15]),
        ("seed", True, [0, 0, 0]),
    ],
)
def test_burst_caps(rule, database, expected):
    a = grid_peaks_map([40, 25, 15])
    f = df.detect(a, "maxima", database=database, burst_rule=rule, nms_iou=None, max_features=200)
    ch = np.asarray(f.channel)[np.asarray(f.mask)]
    np.testing.assert_array_equal(np.bincount(ch, minlength=3), expected)


def test_max_features_over_scales_and_nms_database_only():
    a = grid_peaks_map([12, 12, 12], seed=1)
    q = df.detect([a, 0.9 * a], "maxima", max_features=25)
    strongest = np.sort(np.concatenate([a[a > 0], 0.9 * a[a > 0]]))[::-1][:25]
    np.testing.assert_allclose(np.asarray(q.strength), strongest, rtol=1e-6)
    assert int(q.mask.sum()) == 25 and np.all(np.diff(np.asarray(q.strength)) <= 0)
    # the same 8 peaks in 3 channels: NMS keeps one per location on the database side only
    b = grid_peaks_map([8], seed=2)
    same = np.repeat(b, 3, axis=2) * np.float32([1.0, 0.9, 0.8])
    db = df.detect(same, "maxima", database=True, max_features=100)
    qq = df.detect(same, "maxima", database=False, max_features=100)
    assert int(db.mask.sum()) == 8 and set(np.asarray(db.channel)[np.asarray(db.mask)]) == {0}
    assert int(qq.mask.sum()) == 24


def test_detect_batched_equals_single():
    maps = [
        np.stack([sparse_map(8, 9, 5), sparse_map(8, 9, 5)]),
        np.stack([sparse_map(5, 6, 5)] * 2),
    ]
    batch = df.detect(maps, "maxima", database=True, max_features=30)
    for i in range(2):
        one = df.detect([m[i] for m in maps], "maxima", database=True, max_features=30)
        for field in ("channel", "mu", "sigma", "strength", "scale", "mask"):
            np.testing.assert_allclose(np.asarray(getattr(batch, field))[i], getattr(one, field))


# ---------------------------------------------------------------------------------------------
# MSER


def blob(h, w, cx, cy, sx, sy, amp):
    yy, xx = np.mgrid[:h, :w]
    return amp * np.exp(-((xx - cx) ** 2) / (2 * sx**2) - (yy - cy) ** 2 / (2 * sy**2))


def test_mser_detects_known_blobs():
    h, w = 24, 32
    a = np.zeros((h, w, 3), np.float32)
    a[:, :, 0] = blob(h, w, 8, 6, 2.0, 2.0, 200)
    a[:, :, 1] = blob(h, w, 20, 15, 4.0, 1.5, 150)
    a[:, :, 2] = blob(h, w, 6, 18, 1.5, 1.5, 120) + blob(h, w, 25, 5, 1.5, 1.5, 180)
    f = df.detect(a, "mser", max_features=100)
    mask = np.asarray(f.mask)
    ch, mu, sg, st = (np.asarray(x)[mask] for x in (f.channel, f.mu, f.sigma, f.strength))
    blobs = [(0, 8, 6, 200), (1, 20, 15, 150), (2, 6, 18, 120), (2, 25, 5, 180)]
    owner = np.full(len(ch), -1)
    for b, (k, cx, cy, peak) in enumerate(blobs):
        near = (ch == k) & (np.linalg.norm(mu - [cx, cy], axis=1) < 0.5)
        assert near.any(), (k, cx, cy)
        np.testing.assert_allclose(st[near], peak, rtol=1e-5)
        owner[near] = b
    # every feature is centred on a blob of its channel; the elongated blob gives elongated ellipses
    assert np.all(owner >= 0)
    assert np.all(sg[ch == 1][:, 0, 0] > 2 * sg[ch == 1][:, 1, 1])
    assert np.all(np.abs(sg[ch == 0][:, 0, 0] / sg[ch == 0][:, 1, 1] - 1) < 0.2)


def test_mser_one_polarity_and_regions_vs_numpy_moments():
    h, w = 20, 20
    a = np.full((h, w, 1), 100, np.float32)
    a[:, :, 0] -= blob(h, w, 10, 10, 2.0, 2.0, 90).astype(np.float32)  # a hole, not a peak
    f = df.detect(a, "mser", max_features=50)
    assert not (np.asarray(f.mask) & (np.linalg.norm(np.asarray(f.mu) - 10, axis=1) < 1)).any()
    b = np.float32(blob(h, w, 7, 12, 2.5, 1.5, 200))[:, :, None]
    regions = df.mser_regions(b, pixel_area=True)
    det = cv2.MSER_create(df.mser_delta(df.quantize(b)), 1, int(0.75 * h * w), 0.5, 0.2)
    det.setPass2Only(True)
    pts, _ = det.detectRegions(df.quantize(b)[:, :, 0].copy())
    assert len(pts) == len(regions["mu"]) > 0
    for p, mu, sg, st in zip(
        pts, regions["mu"], regions["sigma"], regions["strength"], strict=True
    ):
        p = p.astype(np.float64)
        np.testing.assert_allclose(mu, p.mean(0), atol=1e-4)
        np.testing.assert_allclose(sg, np.cov(p.T, bias=True) + np.eye(2) / 12, atol=1e-4)
        np.testing.assert_allclose(st, b[p[:, 1].astype(int), p[:, 0].astype(int), 0].max())


def test_quantize_and_delta_rule():
    a = np.float32([[0.0, 3.7, 300.0], [12.9, -1.0, 7.2]])
    np.testing.assert_array_equal(df.quantize(a), [[0, 3, 255], [12, 0, 7]])
    np.testing.assert_array_equal(df.quantize(a, "max"), np.floor(np.clip(a * 255 / 300, 0, 255)))
    q = np.uint8(np.arange(0, 41))
    assert df.mser_delta(q) == 12  # capped
    assert df.mser_delta(np.uint8([0, 0, 1, 2, 3, 4, 5])) == int(
        np.round(np.quantile([1, 2, 3, 4, 5], 0.6))
    )
    assert df.mser_delta(np.zeros(5, np.uint8)) == 1


def test_region_features_vs_numpy_and_singular_ellipses():
    a = np.float32(RNG.random((6, 7, 2)))
    cell = np.array([[3, 2]])
    line = np.array([[1, 4], [2, 4], [3, 4]])
    blob_pts = np.array([[4, 1], [5, 1], [4, 2], [5, 2], [5, 3]])
    regions = [cell, line, blob_pts]
    plain = df.region_features(regions, [0, 1, 1], a)
    assert len(plain["mu"]) == 1  # the single cell and the straight line are singular
    area = df.region_features(regions, [0, 1, 1], a, pixel_area=True)
    assert len(area["mu"]) == 3
    for i, (pts, k) in enumerate(zip(regions, [0, 1, 1], strict=True)):
        p = pts.astype(np.float64)
        cov = (p - p.mean(0)).T @ (p - p.mean(0)) / len(p) + np.eye(2) / 12
        np.testing.assert_allclose(area["mu"][i], p.mean(0), atol=1e-6)
        np.testing.assert_allclose(area["sigma"][i], cov, atol=1e-6)
        assert area["strength"][i] == a[pts[:, 1], pts[:, 0], k].max()
        assert area["channel"][i] == k
    np.testing.assert_allclose(plain["sigma"][0], area["sigma"][2] - np.eye(2) / 12, atol=1e-6)
    assert len(df.region_features([], [], a)["mu"]) == 0


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_normalize_channels_vs_numpy(mode):
    maps = [sparse_map(6, 7, 4), sparse_map(3, 4, 4)]
    for m in maps:
        m[:, :, 2] = 0.0  # an all-zero channel stays zero
    flat = np.concatenate([m.reshape(-1, 4) for m in maps]).astype(np.float64)
    stat = flat.max(0) if mode == "max" else flat.mean(0)
    got = df.normalize_channels(maps, mode)
    for g, m in zip(got, maps, strict=True):
        np.testing.assert_allclose(g, np.where(stat > 0, m / np.where(stat > 0, stat, 1), 0), 1e-6)
    other = [sparse_map(6, 7, 4), sparse_map(3, 4, 4)]
    batched = df.normalize_channels(
        [np.stack([a, b]) for a, b in zip(maps, other, strict=True)], mode
    )
    for g, single in zip(batched, got, strict=True):
        np.testing.assert_allclose(g[0], single, rtol=1e-6)
    with pytest.raises(ValueError, match="channel_norm"):
        df.normalize_channels(maps, "l2")


def test_detect_bad_input():
    a = sparse_map(6, 6, 3)
    with pytest.raises(ValueError, match="method"):
        df.detect(a, "sift")
    with pytest.raises(ValueError, match="burst_rule"):
        df.detect(a, "maxima", burst_rule="x")
    with pytest.raises(ValueError, match="feature_map"):
        df.detect(a[0], "maxima")
    with pytest.raises(ValueError, match="feature_map"):
        df.detect(a.astype(np.int32), "maxima")
    with pytest.raises(ValueError, match="feature_map"):
        df.detect([a, a[:, :, :2]], "maxima")
    with pytest.raises(ValueError, match="max_features"):
        df.detect(a, "maxima", max_features=0)
    with pytest.raises(ValueError, match="nms_iou"):
        df.detect(a, "maxima", nms_iou=1.5)
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        df.detect(bad, "maxima")
    with pytest.raises(ValueError, match="quantize"):
        df.quantize(a, "round")


# ---------------------------------------------------------------------------------------------
# from images


@pytest.fixture(scope="module")
def tiny_net():
    """A random ResNet-18 of width 8 cut after conv3_x by dsm_network (stride 8)."""
    model = RetrievalNet(backbone="resnet18", backbone_kwargs={"width": 8})
    variables = init_retrieval_net(jax.random.key(0), "resnet18", backbone_kwargs={"width": 8})
    return df.dsm_network(model, num_stages=2), variables


@pytest.mark.parametrize("pad_multiple", [1, 32])
def test_activation_maps_vs_direct_forward(tiny_net, pad_multiple):
    """Exact with pad_multiple=1; padded batches keep each image's own map size."""
    model, variables = tiny_net
    rng = np.random.default_rng(0)
    images = [np.float32(rng.random(shape)) for shape in ((45, 61, 3), (61, 45, 3), (45, 61, 3))]
    boxes = [None, (3.0, 5.0, 40.0, 50.0), None]
    scales = (1.0, 0.75)
    windows = list(
        df.activation_maps(
            model,
            variables,
            images,
            scales,
            bboxes=boxes,
            max_side=50,
            batch_size=2,
            pad_multiple=pad_multiple,
            window=2,
        )
    )
    assert [first for first, _ in windows] == [0, 2]
    maps = [per_scale for _, window in windows for per_scale in window]
    for img, box, per_scale in zip(images, boxes, maps, strict=True):
        prepared = prepare_image(img, box, max_side=50)
        for s, a in zip(scales, per_scale, strict=True):
            hw = tuple(max(1, int(np.floor(d * s))) for d in prepared.shape[:2])
            x = jax.image.resize(prepared, (*hw, 3), "bilinear", antialias=False)
            ref = model.apply(variables, x[None], method=RetrievalNet.backbone_features)[0]
            assert a.shape == ref.shape == (*(-(-d // 8) for d in hw), 16)
            if pad_multiple == 1:
                np.testing.assert_allclose(a, ref, atol=1e-4)


def test_extract_features_equal_detect_per_image(tiny_net):
    model, variables = tiny_net
    rng = np.random.default_rng(1)
    images = [np.float32(rng.random(shape)) for shape in ((60, 80, 3), (80, 60, 3), (60, 80, 3))]
    boxes = [(0.0, 0.0, 50.0, 40.0), None, (10.0, 5.0, 70.0, 55.0)]
    opts = dict(scales=(1.0, 0.5), max_side=80, max_features=40, channel_norm="mean")
    got = df.extract_features(
        model, variables, images, bboxes=boxes, database=False, method="maxima", window=2, **opts
    )
    maps = [
        m
        for _, w in df.activation_maps(
            model, variables, images, opts["scales"], bboxes=boxes, max_side=80
        )
        for m in w
    ]
    assert got.mask.shape == (3, 40) and got.mask.any(axis=1).all()
    for i, per_scale in enumerate(maps):
        one = df.detect(per_scale, "maxima", max_features=40, channel_norm="mean")
        for field in ("channel", "mu", "sigma", "strength", "scale", "mask"):
            np.testing.assert_allclose(
                getattr(got, field)[i], getattr(one, field), atol=1e-5, err_msg=field
            )


def test_activation_maps_bad_input(tiny_net):
    model, variables = tiny_net
    img = np.zeros((20, 20, 3), np.float32)
    with pytest.raises(ValueError, match="bboxes"):
        next(df.activation_maps(model, variables, [img], bboxes=[None, None]))
    with pytest.raises(ValueError, match="scales"):
        next(df.activation_maps(model, variables, [img], scales=(1.0, 0.0)))
    with pytest.raises(ValueError, match="window"):
        next(df.activation_maps(model, variables, [img], window=0))
    bad = img.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        next(df.activation_maps(model, variables, [bad]))
