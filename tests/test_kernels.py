"""jret.kernels against direct numpy transcriptions of the match-kernel equations (IJCV 2016)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret import kernels
from jret.kernels import WordSet

RNG = np.random.default_rng(0)
D, K = 16, 12


def l2n(v):
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def np_sigma(u, alpha=3.0, tau=0.0):
    u = np.asarray(u, np.float64)
    return np.where(u >= tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


def random_set(m, a=1, centroids=None, mask_p=0.8):
    """A padded set: descriptors near random words, their ``a`` nearest words, a mask."""
    c = centroids
    x = (c[RNG.integers(0, K, m)] + 0.5 * RNG.normal(size=(m, D))).astype(np.float32)
    d = ((x[:, None] - c[None]) ** 2).sum(-1)
    words = np.argsort(d, axis=1, kind="stable")[:, :a].astype(np.int32)
    return x, RNG.random(m) < mask_p, words


CENTROIDS = RNG.normal(size=(K, D)).astype(np.float32)


def np_aggregate(x, mask, words, c, binary):
    """{word: aggregated vector (l2n) or bits (bool)} per the paper: replicate, then sum per word."""
    out = {}
    for w in sorted({int(v) for v in words[mask].ravel()}):
        rows = mask & (words == w).any(axis=1)
        s = (x[rows].astype(np.float64) - c[w]).sum(0)
        out[w] = s >= 0 if binary else l2n(s)
    return out


def np_asmk(ax, ay, binary, nbits, weights=None, alpha=3.0, tau=0.0):
    w = (lambda c: 1.0) if weights is None else (lambda c: float(weights[c]))
    raw = 0.0
    for c in set(ax) & set(ay):
        u = 1 - 2 * np.sum(ax[c] != ay[c]) / nbits if binary else float(ax[c] @ ay[c])
        raw += w(c) * np_sigma(u, alpha, tau)
    nx, ny = sum(w(c) for c in ax), sum(w(c) for c in ay)
    return raw / np.sqrt(nx * ny)


def as_dict(s: WordSet, binary, nbits=D):
    words, mask = np.asarray(s.words), np.asarray(s.mask)
    data = np.asarray(kernels.unpack_bits(s.data, nbits)) if binary else np.asarray(s.data)
    return {int(w): data[i] for i, w in enumerate(words) if mask[i]}


def test_sigma_alpha():
    u = np.array([-0.9, -0.1, 0.0, 0.05, 0.2, 0.5, 1.0], np.float32)
    for alpha, tau in [(3.0, 0.0), (1.0, 0.0), (3.0, 0.2), (2.5, -0.5)]:
        np.testing.assert_allclose(
            np.asarray(kernels.sigma_alpha(u, alpha, tau)), np_sigma(u, alpha, tau), rtol=1e-6
        )
    assert float(kernels.sigma_alpha(0.2, 3.0, 0.2)) == pytest.approx(0.008)  # u = τ is kept


def test_bits_pack_unpack_and_hamming():
    bits = RNG.random((5, 3, 77)) < 0.5
    codes = kernels.pack_bits(bits)
    assert codes.shape == (5, 3, 3) and codes.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(kernels.unpack_bits(codes, 77)), bits)
    # bit i of word j is dimension 32 j + i
    one = np.zeros(77, bool)
    one[33] = True
    np.testing.assert_array_equal(np.asarray(kernels.pack_bits(one)), [0, 2, 0])
    h = np.asarray(kernels.hamming_distance(codes[:, None], codes[None, :]))
    ref = (bits[:, None] != bits[None, :]).sum(-1)
    np.testing.assert_array_equal(h, ref)
    sim = np.asarray(kernels.hamming_similarity(codes[0], codes[1], 77))
    np.testing.assert_allclose(sim, 1 - 2 * ref[0, 1] / 77, rtol=1e-6)


def test_binarize_zero_rule():
    z = np.array([[-1.0, 0.0, 2.0]], np.float32)
    got = kernels.unpack_bits(kernels.binarize(z), 3)
    assert np.asarray(got).tolist() == [[False, True, True]]  # the seed: b(x) = +1 if x ≥ 0
    compat = kernels.unpack_bits(kernels.binarize(z, asmk_compat=True), 3)
    assert np.asarray(compat).tolist() == [[False, False, True]]


@pytest.mark.parametrize(("binary", "a"), [(True, 1), (False, 1), (True, 3), (False, 3)])
def test_aggregate_matches_numpy(binary, a):
    x, mask, words = random_set(40, a, CENTROIDS)
    agg = kernels.aggregate(x, mask, words, CENTROIDS, binary=binary)
    assert agg.words.shape == (40 * a,)
    got = as_dict(agg, binary)
    ref = np_aggregate(x, mask, words, CENTROIDS, binary)
    assert list(got) == list(ref)  # sorted distinct words
    for w in ref:
        if binary:
            np.testing.assert_array_equal(got[w], ref[w])
        else:
            np.testing.assert_allclose(got[w], ref[w], atol=1e-5)
    # padding slots after the real entries
    n = len(ref)
    assert np.asarray(agg.mask)[:n].all() and not np.asarray(agg.mask)[n:].any()
    assert (np.asarray(agg.words)[n:] == -1).all()


def test_aggregate_batch_equals_loop_and_jit():
    sets = [random_set(30, 2, CENTROIDS) for _ in range(4)]
    x, m, w = (np.stack(t) for t in zip(*sets, strict=True))
    batch = kernels.aggregate(x, m, w, CENTROIDS)
    jitted = jax.jit(lambda *a: kernels.aggregate(*a, CENTROIDS))(x, m, w)
    for i in range(4):
        one = kernels.aggregate(x[i], m[i], w[i], CENTROIDS)
        for leaf_b, leaf_j, leaf_1 in zip(
            jax.tree.leaves(batch), jax.tree.leaves(jitted), jax.tree.leaves(one), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(leaf_b[i]), np.asarray(leaf_1))
            np.testing.assert_array_equal(np.asarray(leaf_j[i]), np.asarray(leaf_1))


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("idf", [False, True])
def test_asmk_matches_numpy(binary, idf):
    weights = RNG.uniform(0.2, 3.0, K).astype(np.float32) if idf else None
    qx, qm, qw = random_set(50, 3, CENTROIDS)
    ys = [random_set(50, 1, CENTROIDS) for _ in range(3)]
    aq = kernels.aggregate(qx, qm, qw, CENTROIDS, binary)
    for y in ys:
        ay = kernels.aggregate(*y, CENTROIDS, binary)
        got = float(kernels.asmk(aq, ay, binary=binary, nbits=D, weights=weights))
        ref = np_asmk(
            np_aggregate(qx, qm, qw, CENTROIDS, binary),
            np_aggregate(*y, CENTROIDS, binary),
            binary,
            D,
            weights,
        )
        assert got == pytest.approx(ref, abs=1e-5)
        if binary:  # default denominator: the packed width, 32 bits (the asmk package's)
            ref32 = np_asmk(as_dict(aq, True), as_dict(ay, True), True, 32, weights)
            assert float(kernels.asmk(aq, ay, weights=weights)) == pytest.approx(ref32, abs=1e-5)
    assert float(kernels.asmk(aq, aq, binary=binary, weights=weights)) == pytest.approx(
        1.0, abs=1e-5
    )


def test_asmk_tau_and_empty_sets():
    x, m, w = random_set(30, 1, CENTROIDS)
    a = kernels.aggregate(x, m, w, CENTROIDS)
    b = kernels.aggregate(x + 0.3 * RNG.normal(size=x.shape).astype(np.float32), m, w, CENTROIDS)
    ref = np_asmk(
        np_aggregate(x, m, w, CENTROIDS, True),
        np_aggregate(x + 0, m, w, CENTROIDS, True),
        True,
        D,
    )
    assert ref == pytest.approx(1.0)
    loose, strict = float(kernels.asmk(a, b, nbits=D)), float(kernels.asmk(a, b, nbits=D, tau=0.5))
    assert strict < loose
    empty = kernels.aggregate(x, np.zeros(30, bool), w, CENTROIDS)
    assert float(kernels.asmk(a, empty)) == 0.0 and float(kernels.asmk(empty, empty)) == 0.0


def np_entries(x, mask, words, c, kind, he=None):
    """[(word, payload)] of the non-aggregated kernels, one per (descriptor, word) pair."""
    out = []
    for i in np.flatnonzero(mask):
        for w in words[i]:
            r = x[i].astype(np.float64) - c[w]
            if kind == "smk":
                out.append((int(w), l2n(r)))
            elif kind == "smk*":
                out.append((int(w), r >= 0))
            elif kind == "he":
                P, med = he
                out.append((int(w), (P @ x[i] - med[w]) >= 0))
            else:
                out.append((int(w), None))
    return out


def np_raw(ex, ey, pair, weights=None, burst=False):
    total = 0.0
    for wx, px in ex:
        s = [pair(px, py) for wy, py in ey if wy == wx]
        s = [v for v in s if v != 0]
        if s:
            per = sum(s) / (np.sqrt(len(s)) if burst else 1.0)
            total += (1.0 if weights is None else weights[wx]) * per
    return total


def np_kernel(ex, ey, pair, **kw):
    return np_raw(ex, ey, pair, **kw) / np.sqrt(
        np_raw(ex, ex, pair, **kw) * np_raw(ey, ey, pair, **kw)
    )


@pytest.mark.parametrize("burst", [False, True])
def test_smk_and_smk_star_match_numpy(burst):
    weights = RNG.uniform(0.5, 2.0, K).astype(np.float32)
    q, y = random_set(25, 2, CENTROIDS), random_set(25, 1, CENTROIDS)
    for binary, kind in [(False, "smk"), (True, "smk*")]:
        sq = kernels.replicate(*q, CENTROIDS, kernel="smk", binary=binary)
        sy = kernels.replicate(*y, CENTROIDS, kernel="smk", binary=binary)
        got = float(kernels.smk(sq, sy, binary=binary, nbits=D, weights=weights, burst=burst))

        def pair(a, b, binary=binary):
            u = 1 - 2 * np.sum(a != b) / D if binary else float(a @ b)
            return np_sigma(u)

        ref = np_kernel(
            np_entries(*q, CENTROIDS, kind),
            np_entries(*y, CENTROIDS, kind),
            pair,
            weights=weights,
            burst=burst,
        )
        assert got == pytest.approx(ref, abs=1e-5)


def test_bow_is_the_weighted_histogram_cosine():
    weights = RNG.uniform(0.5, 2.0, K)
    q, y = random_set(40, 1, CENTROIDS), random_set(30, 1, CENTROIDS)
    hx = np.bincount(q[2][q[1], 0], minlength=K)
    hy = np.bincount(y[2][y[1], 0], minlength=K)
    ref = (weights * hx * hy).sum() / np.sqrt((weights * hx**2).sum() * (weights * hy**2).sum())
    sx = kernels.replicate(*q, kernel="bow")
    sy = kernels.replicate(*y, kernel="bow")
    assert float(kernels.bow(sx, sy, weights)) == pytest.approx(ref, rel=1e-5)


def test_he_learn_and_encode():
    x = RNG.normal(size=(600, D)).astype(np.float32)
    words = RNG.integers(0, K - 1, 600).astype(np.int32)  # word K - 1 stays empty
    he = kernels.he_learn(jax.random.key(0), x, words, K, nbits=8)
    P, med = np.asarray(he.projection), np.asarray(he.medians)
    assert P.shape == (8, D) and med.shape == (K, 8) and he.nbits == 8
    np.testing.assert_allclose(P @ P.T, np.eye(8), atol=1e-5)
    z = x @ P.T
    for c in range(K - 1):
        np.testing.assert_allclose(med[c], np.median(z[words == c], axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(med[K - 1], 0.0)
    fresh = RNG.normal(size=(5, D)).astype(np.float32)  # no exact ties with a median
    codes = kernels.he_encode(fresh, words[:5, None], he)
    bits = np.asarray(kernels.unpack_bits(codes, 8))[:, 0]
    np.testing.assert_array_equal(bits, (fresh @ P.T - med[words[:5]]) >= 0)


@pytest.mark.parametrize("burst", [False, True])
def test_he_matches_numpy(burst):
    he = kernels.he_learn(
        jax.random.key(1),
        RNG.normal(size=(400, D)).astype(np.float32),
        RNG.integers(0, K, 400),
        K,
        nbits=16,
    )
    P, med = np.asarray(he.projection, np.float64), np.asarray(he.medians, np.float64)
    q, y = random_set(30, 2, CENTROIDS), random_set(30, 1, CENTROIDS)
    sq = kernels.replicate(*q, kernel="he", he=he)
    sy = kernels.replicate(*y, kernel="he", he=he)
    got = float(kernels.he(sq, sy, ht=6, sigma=4.0, burst=burst))

    def pair(a, b):
        h = np.sum(a != b)
        return np.exp(-(h**2) / 16.0) if h <= 6 else 0.0

    ref = np_kernel(
        np_entries(*q, CENTROIDS, "he", (P, med)),
        np_entries(*y, CENTROIDS, "he", (P, med)),
        pair,
        burst=burst,
    )
    assert got == pytest.approx(ref, abs=1e-5)


def test_pairwise_equals_loop():
    xs = [kernels.aggregate(*random_set(20, 3, CENTROIDS), CENTROIDS) for _ in range(3)]
    ys = [kernels.aggregate(*random_set(20, 1, CENTROIDS), CENTROIDS) for _ in range(5)]
    stack = lambda sets: jax.tree.map(lambda *a: jnp.stack(a), *sets)  # noqa: E731
    got = np.asarray(kernels.pairwise(kernels.asmk, stack(xs), stack(ys), batch_size=2))
    ref = np.array([[float(kernels.asmk(x, y)) for y in ys] for x in xs])
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_idf_and_document_frequency():
    sets = kernels.aggregate(
        *(np.stack(t) for t in zip(*[random_set(15, 1, CENTROIDS) for _ in range(6)], strict=True)),
        CENTROIDS,
    )
    df = np.asarray(kernels.document_frequency(sets, K))
    words, mask = np.asarray(sets.words), np.asarray(sets.mask)
    ref = np.array([sum(c in set(words[i][mask[i]]) for i in range(6)) for c in range(K)])
    np.testing.assert_array_equal(df, ref)
    w2 = np.asarray(kernels.idf_weights(df, 6))
    w1 = np.asarray(kernels.idf_weights(df, 6, "log"))
    safe = np.maximum(df, 1)
    np.testing.assert_allclose(w2, np.where(df > 0, np.log(6 / safe) ** 2, 1.0), rtol=1e-6)
    np.testing.assert_allclose(w1, np.where(df > 0, np.log(6 / safe), 1.0), rtol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: kernels.aggregate(
                np.zeros((4, 3)), None, np.zeros((5, 1), np.int32), CENTROIDS
            ),
            "words",
        ),
        (lambda: kernels.aggregate(np.zeros((4, D)), None, np.zeros((4, 1)), CENTROIDS), "integer"),
        (
            lambda: kernels.aggregate(
                np.zeros((4, D), np.int32), None, np.zeros((4, 1), np.int32), CENTROIDS
            ),
            "floating",
        ),
        (
            lambda: kernels.aggregate(
                np.zeros((4, 3)), None, np.zeros((4, 1), np.int32), CENTROIDS
            ),
            "centroids",
        ),
        (
            lambda: kernels.aggregate(
                np.zeros((4, D)), np.ones(3, bool), np.zeros((4, 1), np.int32), CENTROIDS
            ),
            "mask",
        ),
        (
            lambda: kernels.replicate(
                np.zeros((4, D)), None, np.zeros((4, 1), np.int32), kernel="he"
            ),
            "HammingEmbedding",
        ),
        (
            lambda: kernels.replicate(
                np.zeros((4, D)), None, np.zeros((4, 1), np.int32), kernel="x"
            ),
            "kernel",
        ),
        (
            lambda: kernels.he_learn(
                jax.random.key(0), np.zeros((4, D)), np.zeros(4, np.int32), K, nbits=D + 1
            ),
            "nbits",
        ),
        (
            lambda: kernels.he_learn(
                jax.random.key(0), np.zeros((4, D)), np.full(4, K, np.int32), K, nbits=8
            ),
            "words",
        ),
        (
            lambda: kernels.he_learn(
                jax.random.key(0), np.full((4, D), np.nan), np.zeros(4, np.int32), K, nbits=8
            ),
            "NaN",
        ),
        (lambda: kernels.idf_weights(np.ones(3), 4, "sqrt"), "variant"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
