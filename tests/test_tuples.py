"""jret.data.tuples: epoch sampling (subset of pairs, random pool), tuple layout, labels."""

import numpy as np
import pytest

from jret.data import tuples as tp


def pairs(num_pairs=40, num_images=100, seed=0):
    """Pairs with distinct queries, so a query identifies its pair."""
    rng = np.random.default_rng(seed)
    q = rng.choice(num_images, num_pairs, replace=False)
    p = (q + 1 + rng.integers(0, num_images - 1, num_pairs)) % num_images
    return q, p


def test_defaults_are_the_reference_ones():
    assert (tp.QUERY_SIZE, tp.POOL_SIZE, tp.NUM_NEGATIVES) == (2000, 20000, 5)


def test_sample_epoch_is_a_subset_of_pairs_and_images():
    q, p = pairs()
    qs, ps, pool = tp.sample_epoch(0, q, p, 100, query_size=15, pool_size=30)
    assert qs.shape == ps.shape == (15,) and pool.shape == (30,)
    assert qs.dtype == ps.dtype == pool.dtype == np.int64
    # Every (query, positive) drawn is a training pair, each pair drawn at most once.
    assert len(np.unique(qs)) == 15
    positive_of = dict(zip(q.tolist(), p.tolist(), strict=True))
    assert all(positive_of[a] == b for a, b in zip(qs.tolist(), ps.tolist(), strict=True))
    assert len(np.unique(pool)) == 30 and pool.min() >= 0 and pool.max() < 100


def test_sample_epoch_caps_at_the_available_sizes():
    q, p = pairs(num_pairs=7, num_images=12)
    qs, ps, pool = tp.sample_epoch(3, q, p, 12)  # defaults 2000 / 20000 exceed both
    order = np.lexsort((ps, qs))
    want = np.lexsort((p, q))
    np.testing.assert_array_equal(qs[order], q[want])
    np.testing.assert_array_equal(ps[order], p[want])
    np.testing.assert_array_equal(np.sort(pool), np.arange(12))


def test_sample_epoch_deterministic_and_seed_dependent():
    q, p = pairs()
    a = tp.sample_epoch((7, 0), q, p, 100, 10, 20)
    b = tp.sample_epoch((7, 0), q, p, 100, 10, 20)
    c = tp.sample_epoch((7, 1), q, p, 100, 10, 20)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_sample_epoch_is_uniform():
    """Each pair and each image is drawn with probability query_size / P, pool_size / N."""
    q = np.arange(10)
    p = (q + 1) % 10
    counts_q, counts_pool = np.zeros(10), np.zeros(10)
    trials = 2000
    for s in range(trials):
        qs, _, pool = tp.sample_epoch(s, q, p, 10, query_size=3, pool_size=4)
        counts_q[qs] += 1
        counts_pool[pool] += 1
    # Binomial(2000, 0.3) and (2000, 0.4): std ≈ 20.5 and 21.9; allow 5 std.
    np.testing.assert_allclose(counts_q, trials * 0.3, atol=5 * 20.5)
    np.testing.assert_allclose(counts_pool, trials * 0.4, atol=5 * 21.9)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.array([0.0, 1.0]), np.array([1, 0]), 5), "integer"),
        ((np.array([0, 1]), np.array([1, 0, 2]), 5), "equal lengths"),
        ((np.array([], np.int64), np.array([], np.int64), 5), "at least one"),
        ((np.array([0, 5]), np.array([1, 0]), 5), r"qidxs.*\[0, 5\)"),
        ((np.array([0, 1]), np.array([-1, 0]), 5), "pidxs"),
        ((np.array([[0, 1]]), np.array([[1, 0]]), 5), "1-D"),
        ((np.array([0, 1]), np.array([1, 0]), 0), "num_images"),
    ],
)
def test_sample_epoch_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        tp.sample_epoch(0, *args)


def test_sample_epoch_bad_sizes():
    with pytest.raises(ValueError, match="query_size"):
        tp.sample_epoch(0, np.array([0]), np.array([1]), 5, query_size=0)
    with pytest.raises(ValueError, match="pool_size"):
        tp.sample_epoch(0, np.array([0]), np.array([1]), 5, pool_size=-1)


def test_make_tuples_layout_and_labels():
    q = np.array([4, 7, 0])
    p = np.array([5, 6, 1])
    n = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]], np.int32)
    t = tp.make_tuples(q, p, n)
    assert t.shape == (3, 7) and t.dtype == np.int64
    for row in range(3):
        assert t[row].tolist() == [q[row], p[row], *n[row].tolist()]
    np.testing.assert_array_equal(tp.tuple_labels(5), [-1, 1, 0, 0, 0, 0, 0])
    assert tp.tuple_labels(2).dtype == np.int32 and tp.tuple_labels(2).tolist() == [-1, 1, 0, 0]
    assert len(tp.tuple_labels()) == 2 + tp.NUM_NEGATIVES


def test_make_tuples_cluster_rule():
    clusters = np.array([0, 0, 1, 1, 2, 2])
    q, p = np.array([0, 2]), np.array([1, 3])
    good = tp.make_tuples(q, p, np.array([[2, 4], [0, 5]]), clusters=clusters)
    assert good.shape == (2, 4)
    with pytest.raises(ValueError, match="tuple 1: a negative"):
        tp.make_tuples(q, p, np.array([[2, 4], [3, 5]]), clusters=clusters)
    with pytest.raises(ValueError, match="tuple 0: positive 4"):
        tp.make_tuples(q, np.array([4, 3]), np.array([[2, 5], [0, 5]]), clusters=clusters)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        tp.make_tuples(q, p, np.array([[2, 6], [0, 5]]), clusters=clusters)
    same = tp.make_tuples(q, p, np.array([[2, 4], [3, 5]]), clusters=clusters, validate=False)
    assert same[1, 2] == 3


@pytest.mark.parametrize(
    "q, p, n, match",
    [
        ([0, 1], [1], [[2], [3]], "same number"),
        ([0, 1], [1, 0], [2, 3], "negatives"),
        ([0, 1], [1, 0], np.zeros((2, 0), int), "at least one negative"),
        ([0.0, 1.0], [1, 0], [[2], [3]], "qidx"),
        ([0, 1], [1, 0], [[2], [-3]], "tuple 1: negative image id"),
    ],
)
def test_make_tuples_bad_input(q, p, n, match):
    with pytest.raises(ValueError, match=match):
        tp.make_tuples(np.asarray(q), np.asarray(p), np.asarray(n))


def test_tuple_labels_bad_input():
    with pytest.raises(ValueError, match="num_negatives"):
        tp.tuple_labels(0)
