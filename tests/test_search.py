"""jret.search against numpy brute force: scores, stable tie order, chunking, dtypes, devices."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from multidevice import run_on_devices

from jret import search

RNG = np.random.default_rng(0)


def brute_force(Q, X, k):
    """float64 scores and a stable argsort of ``-S``: ties keep the lower database index."""
    s = np.asarray(Q, np.float64) @ np.asarray(X, np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def int_rows(n, d, high=3):
    """Integer-valued float32 rows: every score is exact, and small ``high`` gives many ties."""
    return RNG.integers(-high, high + 1, size=(n, d)).astype(np.float32)


def unit_rows(n, d):
    x = RNG.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# chunk 256 with k = 10 merges items directly; 400 uses blocks with a 200-row tail; 16384 is a
# single chunk of 992 rows plus an 8-row tail padded to one block.
@pytest.mark.parametrize(
    ("k", "chunk_size"), [(1, 400), (10, 256), (10, 400), (10, 16384), (1000, 400)]
)
def test_knn_exact_with_ties(k, chunk_size):
    Q, X = int_rows(37, 64), int_rows(1000, 64)
    scores, ids = search.knn(Q, X, k, chunk_size=chunk_size)
    ref_scores, ref_ids = brute_force(Q, X, k)
    assert scores.shape == (37, k) and scores.dtype == jnp.float32
    assert ids.shape == (37, k) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_array_equal(np.asarray(scores), ref_scores)


def test_knn_unit_vectors():
    k = 100
    Q, X = unit_rows(37, 64), unit_rows(5000, 64)
    scores, ids = search.knn(Q, X, k, chunk_size=3200)
    ref_scores, ref_ids = brute_force(Q, X, k)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5)
    exact = Q.astype(np.float64) @ X.T.astype(np.float64)
    np.testing.assert_allclose(np.take_along_axis(exact, np.asarray(ids), 1), ref_scores, atol=1e-5)
    assert np.mean(np.asarray(ids) == ref_ids) > 0.99


def test_ties_all_equal_database():
    X = np.tile(int_rows(1, 16), (700, 1))
    for chunk_size in [100, 640, 16384]:
        scores, ids = search.knn(int_rows(5, 16), X, 20, chunk_size=chunk_size)
        np.testing.assert_array_equal(np.asarray(ids), np.tile(np.arange(20), (5, 1)))
        assert np.all(np.asarray(scores) == np.asarray(scores)[:, :1])


def test_ties_in_a_few_rows_only():
    # Wide integer range: ties are rare, except for queries 0-2, for which item 900 is a copy of
    # item 100 up to the first coordinate, which those queries ignore.
    Q, X = int_rows(40, 16, high=1000), int_rows(2000, 16, high=1000)
    X[900] = X[100]
    X[900, 0] += 7
    Q[:3] = X[100]
    Q[:3, 0] = 0
    scores, ids = search.knn(Q, X, 5, chunk_size=512)
    _, ref_ids = brute_force(Q, X, 5)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    assert list(ref_ids[0, :2]) == [100, 900]


def test_tie_at_the_cut():
    # Items 3 and 40 tie at the k-th place: the lower index must be kept.
    X = np.zeros((64, 4), np.float32)
    X[:, 0] = -np.arange(64)
    X[3] = X[40] = [5, 0, 0, 0]
    X[7] = [9, 0, 0, 0]
    q = np.array([[1, 0, 0, 0]], np.float32)
    for chunk_size in [8, 64]:
        _, ids = search.knn(q, X, 2, chunk_size=chunk_size)
        np.testing.assert_array_equal(np.asarray(ids), [[7, 3]])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    Q, X = unit_rows(37, 64), unit_rows(1000, 64)
    scores, ids = search.knn(jnp.asarray(Q, dtype), jnp.asarray(X, dtype), 10)
    assert scores.dtype == jnp.float32
    # Accumulation is float32: against float64 on the rounded inputs the error is float32-sized.
    q_r = np.asarray(jnp.asarray(Q, dtype).astype(jnp.float32))
    x_r = np.asarray(jnp.asarray(X, dtype).astype(jnp.float32))
    ref_scores, _ = brute_force(q_r, x_r, 10)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5)
    # Against the float32 inputs the error is bounded by the input rounding: each product is off
    # by at most 2·2^-p relative (p = 8 for bfloat16, 11 for float16).
    u = 2.0 ** -(8 if dtype == jnp.bfloat16 else 11)
    bound = 2 * u * (np.abs(Q) @ np.abs(X).T).max()
    exact, _ = brute_force(Q, X, 10)
    assert np.abs(np.asarray(scores) - exact).max() <= bound


def test_mixed_dtypes():
    Q, X = unit_rows(9, 32), unit_rows(500, 32)
    scores, ids = search.knn(Q, jnp.asarray(X, jnp.bfloat16), 7)
    x_r = np.asarray(jnp.asarray(X, jnp.bfloat16).astype(jnp.float32))
    ref_scores, _ = brute_force(Q, x_r, 7)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=1e-5)


def test_jit_and_no_jit_agree():
    Q, X = int_rows(6, 8), int_rows(200, 8)
    ref = search.knn(Q, X, 2, chunk_size=64)
    eager = search.knn_chunked(jnp.asarray(Q), jnp.asarray(X), 2, chunk_size=64)
    np.testing.assert_array_equal(np.asarray(eager[0]), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(eager[1]), brute_force(Q, X, 2)[1])


def test_inside_user_jit_with_query_chunks():
    Q, X = int_rows(37, 64), int_rows(1000, 64)
    ref = search.knn(Q, X, 10, chunk_size=400)
    scores, ids = jax.jit(lambda q, x: search.knn_chunked(2 * q, x, 10, 400, 8))(Q, X)
    np.testing.assert_array_equal(np.asarray(scores), 2 * np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref[1]))


def test_vmap_over_query_sets():
    Qs, X = int_rows(3 * 11, 16).reshape(3, 11, 16), int_rows(700, 16)
    _, ids = jax.jit(jax.vmap(lambda q: search.knn_chunked(q, X, 4, 320)))(Qs)
    for q, got in zip(Qs, np.asarray(ids), strict=True):
        np.testing.assert_array_equal(got, brute_force(q, X, 4)[1])


def test_ranks_all_is_the_full_stable_ranking():
    Q, X = int_rows(13, 16), int_rows(300, 16)
    ranks = search.ranks_all(Q, X, chunk_size=5)
    assert ranks.shape == (13, 300) and ranks.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ranks), brute_force(Q, X, 300)[1])
    np.testing.assert_array_equal(np.asarray(search.knn(Q, X, 300)[1]), np.asarray(ranks))


def test_knn_sharded_one_device():
    mesh = Mesh(np.array(jax.devices()[:1]), ("db",))
    Q, X = int_rows(7, 16), int_rows(1003, 16)
    got = search.knn_sharded(Q, X, 10, mesh, chunk_size=320)
    ref = search.knn(Q, X, 10, chunk_size=320)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))


_SHARDED_CHECK = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jret import search

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    one_d = Mesh(np.array(jax.devices()), ("db",))
    two_d = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "db"))
    for n, k, chunk, mesh in [(1003, 10, 64, one_d), (1000, 10, 16384, two_d),
                              (37, 30, 64, one_d), (5, 5, 64, one_d), (1003, 1, 64, one_d)]:
        Q = rng.integers(-2, 3, (9, 16)).astype(np.float32)
        X = rng.integers(-2, 3, (n, 16)).astype(np.float32)
        s = Q.astype(np.float64) @ X.T.astype(np.float64)
        ref = np.argsort(-s, axis=1, kind="stable")[:, :k]
        want = search.knn(Q, X, k, chunk_size=chunk)
        got = search.knn_sharded(Q, X, k, mesh, chunk_size=chunk)
        assert np.array_equal(np.asarray(got[1]), ref), (n, k)
        assert np.array_equal(np.asarray(got[1]), np.asarray(want[1])), (n, k)
        assert np.array_equal(np.asarray(got[0]), np.asarray(want[0])), (n, k)
    X = rng.integers(-2, 3, (64, 16)).astype(np.float32)
    ref = np.argsort(-(Q.astype(np.float64) @ X.T), axis=1, kind="stable")[:, :3]
    X = jax.device_put(X, NamedSharding(one_d, P("db")))
    assert np.array_equal(np.asarray(search.knn_sharded(Q, X, 3, one_d)[1]), ref)
    print("sharded ok")
    """
)


def test_knn_sharded_eight_simulated_devices():
    run_on_devices(_SHARDED_CHECK)


@pytest.mark.parametrize(
    ("queries", "database", "k", "match"),
    [
        (np.zeros((3, 5), np.float32), np.zeros((10, 4), np.float32), 2, "dimension mismatch"),
        (np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32), 11, "at most n = 10"),
        (np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32), 0, "positive integer"),
        (np.zeros((3, 4), np.float32), np.zeros((0, 4), np.float32), 1, "database: expected at"),
        (np.zeros((0, 4), np.float32), np.zeros((10, 4), np.float32), 1, "queries: expected at"),
        (np.full((3, 4), np.nan, np.float32), np.zeros((10, 4), np.float32), 1, "NaN/inf"),
        (np.zeros((3, 4), np.float32), np.full((10, 4), np.inf, np.float32), 1, "NaN/inf"),
        (np.zeros((3, 4), np.int32), np.zeros((10, 4), np.float32), 1, "floating dtype"),
        (np.zeros(4, np.float32), np.zeros((10, 4), np.float32), 1, r"queries \(nq, D\)"),
    ],
)
def test_bad_input(queries, database, k, match):
    with pytest.raises(ValueError, match=match):
        search.knn(queries, database, k)


def test_trace_time_checks_and_validate_switch():
    with pytest.raises(ValueError, match="dimension mismatch"):
        jax.jit(lambda q, x: search.knn_chunked(q, x, 2))(np.zeros((3, 5)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="chunk_size"):
        search.knn(np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32), 2, chunk_size=0)
    with pytest.raises(ValueError, match="axis_name"):
        mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        search.knn_sharded(np.zeros((3, 4)), np.zeros((10, 4)), 2, mesh)
    X = np.zeros((10, 4), np.float32)
    X[5] = np.nan
    search.knn(np.zeros((3, 4), np.float32), X, 2, validate=False)
    with pytest.raises(ValueError, match="NaN/inf"):
        search.ranks_all(np.zeros((3, 4), np.float32), X)
