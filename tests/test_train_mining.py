import textwrap

import numpy as np
import pytest
from multidevice import run_on_devices

from jret.normalize import l2n
from jret.train.mining import mine_hard_negatives, select_negatives


def _data(rng, nq=12, n=300, d=16, n_clusters=40):
    q = np.asarray(l2n(rng.normal(size=(nq, d)).astype(np.float32)))
    pool = np.asarray(l2n(rng.normal(size=(n, d)).astype(np.float32)))
    return q, pool, rng.integers(0, n_clusters, nq), rng.integers(0, n_clusters, n)


def _reference(q, pool, qc, pc, nnum):
    """Walk the pool by decreasing similarity (stable), one image per new foreign cluster."""
    out = []
    for i in range(len(q)):
        order = np.argsort(-(pool @ q[i]), kind="stable")
        taken, clusters = [], set()
        for j in order:
            if pc[j] != qc[i] and pc[j] not in clusters:
                taken.append(j)
                clusters.add(pc[j])
            if len(taken) == nnum:
                break
        out.append(taken)
    return np.array(out)


@pytest.mark.parametrize("candidates", [None, 5, 300])
def test_matches_reference(candidates):
    q, pool, qc, pc = _data(np.random.default_rng(0))
    neg, avg = mine_hard_negatives(q, pool, qc, pc, num_negatives=5, candidates=candidates)
    ref = _reference(q, pool, qc, pc, 5)
    np.testing.assert_array_equal(neg, ref)
    dist = np.linalg.norm(q[:, None] - pool[ref] + 1e-6, axis=-1).mean()
    np.testing.assert_allclose(avg, dist, rtol=1e-5)


def test_few_clusters_forces_a_longer_shortlist():
    rng = np.random.default_rng(1)
    q, pool, _, _ = _data(rng, nq=4, n=200)
    # the 150 most similar images of each query share a cluster: the shortlist must grow
    pc = np.zeros(200, np.int64)
    sims = pool @ q.mean(0)
    pc[np.argsort(sims)[:50]] = np.arange(1, 51)
    qc = np.full(4, 99)
    neg, _ = mine_hard_negatives(q, pool, qc, pc, num_negatives=5)
    np.testing.assert_array_equal(neg, _reference(q, pool, qc, pc, 5))
    assert all(len(set(pc[row])) == 5 for row in neg)


def test_not_enough_clusters_is_an_error():
    q, pool, _, _ = _data(np.random.default_rng(2), nq=3, n=30)
    pc = np.arange(30) % 3
    with pytest.raises(ValueError, match="pool_clusters: query"):
        mine_hard_negatives(q, pool, np.zeros(3, np.int64), pc, num_negatives=5)


def test_select_negatives_edge_cases():
    ids = np.array([[7, 8, 9, 10]])
    clusters = np.array([[3, 3, 1, 1]])
    neg, count = select_negatives(ids, clusters, np.array([1]), 1)
    assert neg.tolist() == [[7]] and count.tolist() == [1]


def test_bad_input():
    q, pool, qc, pc = _data(np.random.default_rng(3))
    with pytest.raises(ValueError, match="query_clusters: expected an integer"):
        mine_hard_negatives(q, pool, qc.astype(np.float32), pc)
    with pytest.raises(ValueError, match="pool_desc and pool_clusters"):
        mine_hard_negatives(q, pool, qc, pc[:-1])
    with pytest.raises(ValueError, match="NaN/inf"):
        bad = pool.copy()
        bad[0, 0] = np.nan
        mine_hard_negatives(q, bad, qc, pc)
    with pytest.raises(ValueError, match="num_negatives"):
        mine_hard_negatives(q, pool, qc, pc, num_negatives=0)


def test_sharded_pool_on_eight_simulated_devices():
    code = textwrap.dedent(
        """
        import numpy as np, jax
        from jret.normalize import l2n
        from jret.train.mining import mine_hard_negatives
        from jret.train.parallel import make_mesh
        assert len(jax.devices()) == 8
        rng = np.random.default_rng(0)
        q = np.asarray(l2n(rng.normal(size=(10, 16)).astype(np.float32)))
        pool = np.asarray(l2n(rng.normal(size=(203, 16)).astype(np.float32)))
        qc, pc = rng.integers(0, 30, 10), rng.integers(0, 30, 203)
        a, da = mine_hard_negatives(q, pool, qc, pc)
        b, db = mine_hard_negatives(q, pool, qc, pc, mesh=make_mesh(), axis_name="data")
        np.testing.assert_array_equal(a, b)
        assert abs(da - db) < 1e-6
        print("ok")
        """
    )
    run_on_devices(code)
