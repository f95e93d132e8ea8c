"""DSM spatial matching and re-ranking (jret.spatial) against brute-force numpy references."""

import itertools

import jax
import numpy as np
import pytest

from jret import dsm_features as df
from jret import spatial
from jret.dsm_features import LocalFeatures

RNG = np.random.default_rng(5)
OPTS = dict(max_correspondences=512, chunk=128)  # one compiled verification per feature shape


# ---------------------------------------------------------------------------------------------
# numpy references


def np_hypothesis(mu1, s1, mu2, s2):
    """A = L2 L1^-1 with numpy's (lower) Cholesky of the (x, y) covariances; t = mu2 - A mu1."""
    l1, l2 = np.linalg.cholesky(s1.astype(np.float64)), np.linalg.cholesky(s2.astype(np.float64))
    a = l2 @ np.linalg.inv(l1)
    return a, mu2 - a @ mu1


def np_fit(src, dst):
    """Least squares of x' = a x + tx and y' = b x + c y + ty (numpy lstsq)."""
    if len(src) < 3:
        return None
    ones = np.ones(len(src))
    mx = np.stack([src[:, 0], ones], 1)
    my = np.stack([src[:, 0], src[:, 1], ones], 1)
    if np.linalg.matrix_rank(my) < 3:
        return None
    (a, tx), *_ = np.linalg.lstsq(mx, dst[:, 0], rcond=None)
    (b, c, ty), *_ = np.linalg.lstsq(my, dst[:, 1], rcond=None)
    return np.array([[a, 0.0], [b, c]]), np.array([tx, ty])


def np_pairs(q, d):
    qm, dm = np.asarray(q.mask), np.asarray(d.mask)
    qc, dc = np.asarray(q.channel), np.asarray(d.channel)
    return np.array(
        [
            (i, j)
            for i in range(len(qm))
            if qm[i]
            for j in range(len(dm))
            if dm[j] and qc[i] == dc[j]
        ],
        np.int64,
    ).reshape(-1, 2)


def np_verify(q, d, thr=2.0, smax=3.0, lo_iters=5, lo_cand=4):
    """Enumerate every hypothesis, LO on the lo_cand best; returns (inliers, A, t, inlier pairs)."""
    pairs = np_pairs(q, d)
    if len(pairs) == 0:
        return 0, None, None, set()
    qi, di = pairs[:, 0], pairs[:, 1]
    src = np.asarray(q.mu, np.float64)[qi]
    dst = np.asarray(d.mu, np.float64)[di]
    sq, sd = np.asarray(q.scale)[qi], np.asarray(d.scale)[di]
    qs, ds = np.asarray(q.sigma)[qi], np.asarray(d.sigma)[di]

    def inl(a, t, h):
        err = np.linalg.norm(src @ a.T + t - dst, axis=1)
        return (err <= thr) & (sq == sq[h]) & (sd == sd[h])

    def scale_ok(a):
        det = abs(np.linalg.det(a))
        return 1 / smax**2 <= det <= smax**2

    hyps = [np_hypothesis(src[h], qs[h], dst[h], ds[h]) for h in range(len(pairs))]
    counts = np.array([inl(a, t, h).sum() if scale_ok(a) else 0 for h, (a, t) in enumerate(hyps)])
    best = (0, None, None, None)
    for h in np.argsort(-counts, kind="stable")[:lo_cand]:
        if counts[h] == 0:
            continue
        a, t = hyps[h]
        n = counts[h]
        for _ in range(lo_iters):
            fit = np_fit(src[inl(a, t, h)], dst[inl(a, t, h)])
            if fit is None or not scale_ok(fit[0]):
                continue
            n2 = inl(*fit, h).sum()
            if n2 > n:
                (a, t), n = fit, n2
        if n > best[0]:
            best = (n, a, t, h)
    n, a, t, h = best
    if h is None:
        return 0, None, None, set()
    return int(n), a, t, {tuple(p) for p in pairs[inl(a, t, h)]}


def make_features(channel, mu, sigma, scale=None, strength=None, mask=None):
    m = len(channel)
    return LocalFeatures(
        channel=np.asarray(channel, np.int32),
        mu=np.asarray(mu, np.float32),
        sigma=np.asarray(sigma, np.float32),
        strength=np.asarray(np.ones(m) if strength is None else strength, np.float32),
        scale=np.asarray(np.zeros(m) if scale is None else scale, np.int32),
        mask=np.ones(m, bool) if mask is None else np.asarray(mask, bool),
    )


def random_sigma(n, lo=0.4, hi=2.0):
    rot = RNG.uniform(0, np.pi, n)
    ax = RNG.uniform(lo, hi, (n, 2))
    r = np.stack(
        [np.stack([np.cos(rot), -np.sin(rot)], -1), np.stack([np.sin(rot), np.cos(rot)], -1)], -2
    )
    return r @ (ax[:, :, None] ** 2 * np.eye(2)) @ r.transpose(0, 2, 1)


def related_pair(m=60, n_out=20, channels=12, a=((1.3, 0.0), (0.2, 0.9)), t=(3.0, -2.0), scales=1):
    """Query features and database features = the query's mapped by (a, t) plus outliers."""
    a, t = np.asarray(a), np.asarray(t)
    mu = RNG.uniform(0, 30, (m, 2))
    sig = random_sigma(m)
    ch = RNG.integers(0, channels, m)
    sc = RNG.integers(0, scales, m)
    mu2, sig2 = mu @ a.T + t, a @ sig @ a.T
    mu2[m - n_out :] = RNG.uniform(0, 30, (n_out, 2))
    q = make_features(ch, mu, sig, scale=sc, strength=RNG.uniform(1, 2, m))
    d = make_features(ch, mu2, sig2, scale=sc, strength=RNG.uniform(1, 2, m))
    return q, d


# ---------------------------------------------------------------------------------------------
# hypotheses and fitting


def test_ellipse_hypothesis_vs_numpy():
    n = 50
    mu1, mu2 = RNG.normal(size=(n, 2)) * 10, RNG.normal(size=(n, 2)) * 10
    s1, s2 = random_sigma(n), random_sigma(n)
    a, t = spatial.ellipse_hypothesis(*(np.float32(x) for x in (mu1, s1, mu2, s2)))
    for k in range(n):
        a_ref, t_ref = np_hypothesis(mu1[k], s1[k], mu2[k], s2[k])
        np.testing.assert_allclose(a[k], a_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(t[k], t_ref, rtol=1e-4, atol=1e-3)
    a = np.asarray(a, np.float64)
    assert np.all(a[:, 0, 1] == 0)  # upright: x' depends on x only
    np.testing.assert_allclose(a @ s1 @ a.transpose(0, 2, 1), s2, rtol=1e-3, atol=1e-3)


def test_ellipse_hypothesis_recovers_upright_map_and_ignores_ellipse_scale():
    a_true = np.array([[1.5, 0.0], [-0.4, 0.7]])
    s1 = random_sigma(1)[0]
    mu1 = np.array([4.0, 7.0])
    a, t = spatial.ellipse_hypothesis(
        np.float32(mu1),
        np.float32(s1),
        np.float32(a_true @ mu1 + 1),
        np.float32(a_true @ s1 @ a_true.T),
    )
    np.testing.assert_allclose(a, a_true, atol=1e-5)
    np.testing.assert_allclose(t, [1, 1], atol=1e-4)
    a4, _ = spatial.ellipse_hypothesis(
        np.float32(mu1), np.float32(4 * s1), np.float32(mu1), np.float32(4 * a_true @ s1 @ a_true.T)
    )
    np.testing.assert_allclose(a4, a_true, atol=1e-5)


def test_fit_upright_vs_lstsq():
    src = RNG.uniform(0, 20, (40, 2)).astype(np.float32)
    dst = (src @ np.array([[1.2, 0], [0.3, 0.8]]).T + [2, -1] + RNG.normal(0, 0.2, (40, 2))).astype(
        np.float32
    )
    w = RNG.random(40) < 0.6
    a, t, ok = spatial.fit_upright(src, dst, w)
    a_ref, t_ref = np_fit(src[w].astype(np.float64), dst[w].astype(np.float64))
    assert bool(ok)
    np.testing.assert_allclose(a, a_ref, atol=1e-4)
    np.testing.assert_allclose(t, t_ref, atol=1e-3)


@pytest.mark.parametrize("n", [0, 2])
def test_fit_upright_degenerate(n):
    src = np.float32(RNG.uniform(0, 5, (6, 2)))
    w = np.arange(6) < n
    assert not bool(spatial.fit_upright(src, src, w)[2])
    collinear = np.float32(np.stack([np.arange(6), np.zeros(6)], 1))
    assert not bool(spatial.fit_upright(collinear, collinear, np.ones(6, bool))[2])


# ---------------------------------------------------------------------------------------------
# verification


def test_tentative_correspondences_vs_numpy_and_truncation():
    q = make_features(RNG.integers(0, 5, 30), np.zeros((30, 2)), np.tile(np.eye(2), (30, 1, 1)))
    d = make_features(
        RNG.integers(0, 5, 25),
        np.zeros((25, 2)),
        np.tile(np.eye(2), (25, 1, 1)),
        mask=RNG.random(25) < 0.8,
    )
    ref = np_pairs(q, d)
    pairs, valid, n = spatial.tentative_correspondences(q, d, 512)
    assert int(n) == len(ref) and int(valid.sum()) == len(ref)
    np.testing.assert_array_equal(np.asarray(pairs)[np.asarray(valid)], ref)
    pairs, valid, n = spatial.tentative_correspondences(q, d, 16)
    assert int(n) == len(ref) and bool(valid.all())
    np.testing.assert_array_equal(pairs, ref[:16])


def test_verify_recovers_transform_and_inlier_set():
    a_true = np.array([[1.3, 0.0], [0.2, 0.9]])
    q, d = related_pair(a=a_true)
    m = spatial.verify(q, d, **OPTS)
    n_ref, a_ref, t_ref, inl_ref = np_verify(q, d)
    assert int(m.inliers) == n_ref >= 40
    np.testing.assert_allclose(np.asarray(m.transform)[:, :2], a_true, atol=1e-3)
    np.testing.assert_allclose(np.asarray(m.transform)[:, 2], [3.0, -2.0], atol=1e-2)
    got = {tuple(p) for p in np.asarray(m.pairs)[np.asarray(m.inlier_mask)]}
    assert got == inl_ref
    assert {(i, i) for i in range(40)} <= got  # every true correspondence is an inlier
    assert int(m.n_tentative) == len(np_pairs(q, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_vs_numpy_reference_multiscale(seed):
    rng = np.random.default_rng(seed)
    m = 45
    a = np.array([[0.8, 0.0], [0.1, 1.1]])
    mu = rng.uniform(0, 25, (m, 2))
    sig = random_sigma(m)
    ch = rng.integers(0, 6, m)
    sq = rng.integers(0, 3, m)
    noisy = mu @ a.T + [1, 2] + rng.normal(0, 1.0, (m, 2))
    noisy[30:] = rng.uniform(0, 25, (15, 2))
    q = make_features(ch, mu, sig, scale=sq)
    d = make_features(ch, noisy, a @ sig @ a.T, scale=rng.integers(0, 3, m))
    match = spatial.verify(q, d, **OPTS)
    n_ref, _, _, inl_ref = np_verify(q, d)
    assert int(match.inliers) == n_ref
    assert {tuple(p) for p in np.asarray(match.pairs)[np.asarray(match.inlier_mask)]} == inl_ref


def test_verify_scale_change_limit():
    q, _ = related_pair(n_out=0)
    for s, expect_found in ((2.5, True), (4.0, False)):
        a = np.eye(2) * s
        d = q.replace(
            mu=np.float32(np.asarray(q.mu) @ a.T), sigma=np.float32(a @ np.asarray(q.sigma) @ a.T)
        )
        m = spatial.verify(q, d, **OPTS)
        assert (int(m.inliers) >= 60) == expect_found
        assert int(m.inliers) == np_verify(q, d)[0]
        if not expect_found:  # only chance hypotheses between different features remain
            assert 1 <= int(m.inliers) < 10


def test_verify_threshold_is_in_cells():
    q, d = related_pair(n_out=0, a=np.eye(2), t=(0, 0))
    shifted = d.replace(mu=np.asarray(d.mu) + np.float32([0.0, 1.9]))
    # a pure shift keeps every correspondence consistent with the hypothesis of any of them
    assert int(spatial.verify(q, shifted, **OPTS).inliers) >= 60
    noisy = d.replace(mu=np.asarray(d.mu) + np.float32(RNG.choice([-3.0, 3.0], (60, 2))))
    n_ref = np_verify(q, noisy)[0]
    assert int(spatial.verify(q, noisy, **OPTS).inliers) == n_ref < 60


def test_verify_no_correspondences():
    q, d = related_pair()
    d = d.replace(channel=np.asarray(d.channel) + 100)
    m = spatial.verify(q, d, **OPTS)
    assert int(m.inliers) == 0 and int(m.n_tentative) == 0 and not bool(m.inlier_mask.any())
    empty = d.replace(mask=np.zeros_like(np.asarray(d.mask)))
    assert int(spatial.verify(q, empty, **OPTS).inliers) == 0


def test_verify_batched_equals_single_and_jit_equals_eager():
    q, d1 = related_pair()
    _, d2 = related_pair()
    _, d3 = related_pair(a=np.eye(2))
    batch = df.stack_features([d1, d2, d3])
    many = spatial.verify(q, batch, image_batch=2, **OPTS)
    singles = [spatial.verify(q, d, **OPTS) for d in (d1, d2, d3)]
    np.testing.assert_array_equal(many.inliers, [int(s.inliers) for s in singles])
    np.testing.assert_allclose(
        many.transform, np.stack([s.transform for s in singles]), rtol=1e-5, atol=1e-5
    )
    q, d = related_pair(m=16, n_out=4, channels=4)
    jitted = spatial.verify(q, d, max_correspondences=128, chunk=64)
    with jax.disable_jit():
        eager = spatial.verify(q, d, max_correspondences=128, chunk=64)
    assert int(eager.inliers) == int(jitted.inliers) == np_verify(q, d)[0]
    np.testing.assert_allclose(eager.transform, jitted.transform, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# re-ranking


def np_scale_pairs_verify(q, d):
    """The paper's score: the best verification over the (query scale, image scale) pairs."""
    best = 0
    for sq, sd in itertools.product(np.unique(q.scale), np.unique(d.scale)):
        qs = q.replace(mask=np.asarray(q.mask) & (np.asarray(q.scale) == sq))
        ds = d.replace(mask=np.asarray(d.mask) & (np.asarray(d.scale) == sd))
        best = max(best, np_verify(qs, ds)[0])
    return best


def np_rerank(ids, qs, dbs, top, junk=None):
    out, inl_out = [], []
    for i, row in enumerate(ids):
        row = list(row)
        if junk is not None:
            row = [r for r in row if r not in set(junk[i])] + [r for r in row if r in set(junk[i])]
        short = row[:top]
        inl = [np_scale_pairs_verify(qs[i], dbs[j]) for j in short]
        order = np.argsort(-np.array(inl), kind="stable")
        out.append([short[k] for k in order] + row[top:])
        inl_out.append([inl[k] for k in order])
    return np.array(out), np.array(inl_out)


@pytest.fixture(scope="module")
def rerank_data():
    """3 queries, 10 database images sharing 5 + 2j features with query j % 3, and 12 + 2j
    features in all (so that pairs need different numbers of correspondences)."""
    qs, dbs = [], []
    for _ in range(3):
        q, _ = related_pair(m=30, n_out=10, channels=8)
        qs.append(q)
    for j in range(10):
        base = qs[j % 3]
        n_keep = 5 + 2 * j
        a = np.array([[1.1, 0], [0.1, 0.9]])
        mu = np.asarray(base.mu, np.float64) @ a.T + 1.0
        mu[n_keep:] = RNG.uniform(0, 30, (30 - n_keep, 2))
        dbs.append(
            base.replace(
                mu=np.float32(mu),
                sigma=np.float32(a @ np.asarray(base.sigma) @ a.T),
                mask=np.arange(30) < 12 + 2 * j,
            )
        )
    ids = np.stack([RNG.permutation(10) for _ in range(3)])
    return ids, qs, dbs


def test_rerank_vs_numpy(rerank_data):
    ids, qs, dbs = rerank_data
    new_ids, inl = spatial.rerank(
        ids, df.stack_features(qs), df.stack_features(dbs), top=6, chunk=32
    )
    ref_ids, ref_inl = np_rerank(ids, qs, dbs, 6)
    np.testing.assert_array_equal(new_ids, ref_ids)
    np.testing.assert_array_equal(inl, ref_inl)
    np.testing.assert_array_equal(new_ids[:, 6:], ids[:, 6:])
    assert np.all(np.diff(inl, axis=1) <= 0)


def test_rerank_over_scale_pairs_vs_numpy():
    """Features at 3 scales; the image side of the true matches sits at scale 1."""
    rng = np.random.default_rng(3)
    qs, dbs = [], []
    for i in range(2):
        q, d = related_pair(m=36, n_out=12, channels=6, scales=3)
        d = d.replace(scale=np.int32((np.asarray(q.scale) + i) % 3))
        qs.append(q)
        dbs += [d, d.replace(mu=np.float32(rng.uniform(0, 30, (36, 2))))]
    ids = np.array([[1, 0, 3, 2], [3, 2, 1, 0]])
    Q, D = df.stack_features(qs), df.stack_features(dbs)
    new_ids, inl = spatial.rerank(ids, Q, D, top=3, chunk=32)
    ref_ids, ref_inl = np_rerank(ids, qs, dbs, 3)
    np.testing.assert_array_equal(new_ids, ref_ids)
    np.testing.assert_array_equal(inl, ref_inl)


def test_rerank_drop_junk(rerank_data):
    ids, qs, dbs = rerank_data
    junk = [[int(ids[0, 0]), int(ids[0, 3])], [], [int(ids[2, 9])]]
    new_ids, inl = spatial.rerank(
        ids, df.stack_features(qs), df.stack_features(dbs), top=5, drop_junk=junk, chunk=32
    )
    ref_ids, ref_inl = np_rerank(ids, qs, dbs, 5, junk)
    np.testing.assert_array_equal(new_ids, ref_ids)
    np.testing.assert_array_equal(inl, ref_inl)
    assert not set(new_ids[0, :5]) & set(junk[0])


def test_rerank_by_inliers_times_similarity(rerank_data):
    ids, qs, dbs = rerank_data
    sims = RNG.uniform(0.1, 1.0, ids.shape)
    junk = [[int(ids[0, 1])], [], [int(ids[2, 0])]]
    Q, D = df.stack_features(qs), df.stack_features(dbs)
    new_ids, inl = spatial.rerank(ids, Q, D, top=6, sims=sims, drop_junk=junk, chunk=32)
    for i, row in enumerate(ids.tolist()):
        sim_of = dict(zip(row, sims[i], strict=True))
        row = [r for r in row if r not in junk[i]] + [r for r in row if r in junk[i]]
        short = row[:6]
        counts = [np_scale_pairs_verify(qs[i], dbs[j]) for j in short]
        order = np.argsort(
            [-n * sim_of[j] for n, j in zip(counts, short, strict=True)], kind="stable"
        )
        assert new_ids[i].tolist() == [short[k] for k in order] + row[6:]
        assert inl[i].tolist() == [counts[k] for k in order]


def test_sort_shortlists_vs_python_sort():
    ids = np.stack([RNG.permutation(12) for _ in range(4)])
    inliers = RNG.integers(0, 4, (4, 7))  # many ties: they keep the initial order
    sims = RNG.uniform(0, 1, (4, 7))
    for s in (None, sims):
        new_ids, new_inl = spatial.sort_shortlists(ids, inliers, s)
        for i in range(4):
            key = inliers[i] * (1 if s is None else s[i])
            order = sorted(range(7), key=lambda r, key=key: -key[r])
            assert new_ids[i].tolist() == [ids[i, r] for r in order] + ids[i, 7:].tolist()
            assert new_inl[i].tolist() == [inliers[i, r] for r in order]
    with pytest.raises(ValueError, match="ids"):
        spatial.sort_shortlists(ids[:, :5], inliers)
    with pytest.raises(ValueError, match="sims"):
        spatial.sort_shortlists(ids, inliers, sims[:, :3])


def test_rerank_bad_input(rerank_data):
    ids, qs, dbs = rerank_data
    Q, D = df.stack_features(qs), df.stack_features(dbs)
    with pytest.raises(ValueError, match="ids"):
        spatial.rerank(ids.astype(np.float32), Q, D)
    with pytest.raises(ValueError, match="ids"):
        spatial.rerank(ids + 5, Q, D)
    with pytest.raises(ValueError, match="ids"):
        spatial.rerank(ids[0], Q, D)
    with pytest.raises(ValueError, match="q_feats"):
        spatial.rerank(ids[:2], Q, D)
    with pytest.raises(ValueError, match="drop_junk"):
        spatial.rerank(ids, Q, D, drop_junk=[[1]])
    with pytest.raises(ValueError, match="top"):
        spatial.rerank(ids, Q, D, top=0)
    with pytest.raises(ValueError, match="threshold"):
        spatial.rerank(ids, Q, D, threshold=0.0)
    with pytest.raises(ValueError, match="db_feats.mu"):
        spatial.rerank(ids, Q, D.replace(mu=np.asarray(D.mu)[..., :1]))
    with pytest.raises(ValueError, match="db_feats"):
        spatial.rerank(ids, Q, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="db_feats.mask"):
        spatial.rerank(ids, Q, jax.tree.map(lambda x: np.asarray(x)[None], D))
    with pytest.raises(ValueError, match="channel"):
        spatial.verify(qs[0], dbs[0].replace(channel=np.float32(dbs[0].channel)))
    with pytest.raises(ValueError, match="max_scale_change"):
        spatial.verify(qs[0], dbs[0], max_scale_change=0.5)
    with pytest.raises(ValueError, match="sims"):
        spatial.rerank(ids, Q, D, sims=np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        spatial.rerank(ids, Q, D, sims=np.full(ids.shape, np.nan))
