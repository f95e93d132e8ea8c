"""jret.codebook against numpy brute force: nearest words, multiple assignment, Lloyd steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret import codebook

RNG = np.random.default_rng(0)


def brute_nearest(X, C, a):
    """float64 squared distances and a stable argsort: ties keep the lower centroid id."""
    d = ((np.asarray(X, np.float64)[:, None] - np.asarray(C, np.float64)[None]) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :a]
    return np.take_along_axis(d, ids, 1), ids


def lloyd_step(X, C):
    """One numpy Lloyd iteration; empty clusters are reported with a NaN row."""
    _, ids = brute_nearest(X, C, 1)
    out = np.full(C.shape, np.nan)
    for c in range(C.shape[0]):
        if np.any(ids[:, 0] == c):
            out[c] = X[ids[:, 0] == c].mean(0)
    return out


# (chunk, centroid chunk): one block; rows in a 3-chunk fold with a tail and centroids in blocks
# of 7 (a 3-centroid tail) with a running top-A; one row block, centroids 50 + 2.
@pytest.mark.parametrize(("chunk", "cchunk"), [(4096, 16384), (230, 7), (1000, 50)])
@pytest.mark.parametrize("a", [1, 5])
def test_quantize_matches_brute_force(chunk, cchunk, a):
    X = RNG.normal(size=(700, 24)).astype(np.float32)
    C = RNG.normal(size=(52, 24)).astype(np.float32)
    ids = codebook.quantize(X, C, a, chunk_size=chunk, centroid_chunk_size=cchunk)
    ref_d, ref_ids = brute_nearest(X, C, a)
    assert ids.shape == (700, a) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    d, ids2 = codebook.nearest(X, C, a, chunk_size=chunk, centroid_chunk_size=cchunk)
    np.testing.assert_array_equal(np.asarray(ids2), ref_ids)
    np.testing.assert_allclose(np.asarray(d), ref_d, rtol=1e-4, atol=1e-3)


def test_ties_go_to_the_lower_centroid():
    C = np.repeat(RNG.normal(size=(4, 8)).astype(np.float32), 3, axis=0)  # each word thrice
    X = C[[0, 3, 9]] + 0.01
    for cchunk in (16384, 2):
        ids = np.asarray(codebook.quantize(X, C, 3, centroid_chunk_size=cchunk))
        np.testing.assert_array_equal(ids, [[0, 1, 2], [3, 4, 5], [9, 10, 11]])


def test_padded_sets_and_mask():
    X = RNG.normal(size=(3, 10, 6)).astype(np.float32)
    C = RNG.normal(size=(9, 6)).astype(np.float32)
    mask = RNG.random((3, 10)) < 0.6
    ids = np.asarray(codebook.quantize(X, C, 2, mask=mask))
    assert ids.shape == (3, 10, 2)
    _, ref = brute_nearest(X.reshape(-1, 6), C, 2)
    ref = np.where(mask.reshape(-1, 1), ref, -1).reshape(3, 10, 2)
    np.testing.assert_array_equal(ids, ref)


def test_nearest_jit_equals_eager():
    X = RNG.normal(size=(300, 16)).astype(np.float32)
    C = RNG.normal(size=(40, 16)).astype(np.float32)
    eager = codebook.nearest(X, C, 3, chunk_size=64, centroid_chunk_size=16)
    jitted = jax.jit(lambda x, c: codebook.nearest(x, c, 3, 64, 16))(X, C)
    np.testing.assert_array_equal(np.asarray(eager[1]), np.asarray(jitted[1]))
    np.testing.assert_allclose(np.asarray(eager[0]), np.asarray(jitted[0]), rtol=1e-6)


def test_one_lloyd_iteration_matches_numpy():
    X = RNG.normal(size=(2000, 8)).astype(np.float32)
    key = jax.random.key(3)
    init = np.asarray(codebook.kmeans(key, X, 20, iters=0, chunk_size=300))
    # the initial centroids are 20 distinct training points
    assert len({tuple(r) for r in init}) == 20
    assert all(np.any(np.all(X == r, axis=1)) for r in init)
    step = np.asarray(codebook.kmeans(key, X, 20, iters=1, chunk_size=300, centroid_chunk_size=6))
    ref = lloyd_step(X, init)
    filled = ~np.isnan(ref[:, 0])
    assert filled.all()
    np.testing.assert_allclose(step, ref, rtol=1e-4, atol=1e-5)


def test_kmeanspp_recovers_separated_clusters():
    centers = 20.0 * RNG.normal(size=(6, 5))
    X = (np.repeat(centers, 150, axis=0) + RNG.normal(size=(900, 5))).astype(np.float32)
    C = np.asarray(codebook.kmeans(jax.random.key(0), X, 6, iters=20, init="kmeans++"))
    d, ids = brute_nearest(centers, C, 1)
    assert len(set(ids[:, 0])) == 6  # one centroid per true cluster
    assert np.sqrt(d.max()) < 0.5


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_lloyd_never_increases_the_objective(init):
    X = RNG.normal(size=(1500, 6)).astype(np.float32)
    inertia = []
    for iters in range(5):
        C = codebook.kmeans(jax.random.key(2), X, 12, iters=iters, init=init, chunk_size=512)
        inertia.append(brute_nearest(X, C, 1)[0].sum())
    assert all(b <= a * (1 + 1e-6) for a, b in zip(inertia, inertia[1:], strict=False))
    assert inertia[-1] < inertia[0]


def test_empty_clusters_are_reseeded():
    # three distinct points for five words: duplicated centroids leave clusters empty
    X = np.repeat(np.eye(3, 4, dtype=np.float32), 40, axis=0)
    C = np.asarray(codebook.kmeans(jax.random.key(1), X, 5, iters=4))
    assert np.isfinite(C).all()
    assert all(np.any(np.all(np.isclose(X, r), axis=1)) for r in C)


def test_subsampling_and_determinism():
    X = RNG.normal(size=(5000, 4)).astype(np.float32)
    a = codebook.kmeans(jax.random.key(5), X, 8, iters=2, max_points_per_centroid=10)
    b = codebook.kmeans(jax.random.key(5), jnp.asarray(X), 8, iters=2, max_points_per_centroid=10)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = codebook.kmeans(jax.random.key(6), X, 8, iters=2, max_points_per_centroid=10)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: codebook.kmeans(jax.random.key(0), np.zeros((5, 3), np.float32), 6), "at least k"),
        (lambda: codebook.kmeans(jax.random.key(0), np.zeros((5, 3), np.int32), 2), "floating"),
        (lambda: codebook.kmeans(jax.random.key(0), np.zeros(5, np.float32), 2), r"\(N, D\)"),
        (
            lambda: codebook.kmeans(jax.random.key(0), np.zeros((9, 3), np.float32), 2, init="x"),
            "init",
        ),
        (
            lambda: codebook.kmeans(jax.random.key(0), np.zeros((9, 3), np.float32), 0),
            "k: expected",
        ),
        (
            lambda: codebook.kmeans(jax.random.key(0), np.full((9, 3), np.nan, np.float32), 2),
            "NaN/inf",
        ),
        (lambda: codebook.quantize(np.zeros((4, 3)), np.zeros((5, 2)), 1), r"des: expected"),
        (lambda: codebook.quantize(np.zeros((4, 3)), np.zeros((5, 3)), 6), "at most 5"),
        (lambda: codebook.quantize(np.zeros((4, 3)), np.zeros((5, 3)), 0), "positive integer"),
        (
            lambda: codebook.quantize(np.zeros((4, 3)), np.zeros((5, 3)), mask=np.ones(3, bool)),
            "mask",
        ),
        (lambda: codebook.quantize(np.full((4, 3), np.inf), np.zeros((5, 3))), "NaN/inf"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validate_switch_and_empty_input():
    nan = np.full((4, 3), np.nan, np.float32)
    ids = codebook.quantize(nan, np.zeros((5, 3), np.float32), validate=False)
    assert ids.shape == (4, 1)
    assert codebook.quantize(np.zeros((0, 3), np.float32), np.ones((5, 3))).shape == (0, 1)
