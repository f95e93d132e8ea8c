"""jret.graph against brute-force numpy transcriptions of Iscen et al., CVPR 2017, eqs. 1, 2, 5, 6."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.csgraph
from multidevice import run_on_devices

from jret import graph as G


def clustered(n, d=16, centres=8, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference(X, k, gamma=3.0, mutual=True):
    """Dense ``W`` and ``S`` by brute force: self excluded, top-k by similarity, ``max(s,0)^γ``."""
    X = X.astype(np.float64)
    sim = X @ X.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    A = np.zeros_like(sim)
    rows = np.arange(len(X))[:, None]
    A[rows, nn] = np.maximum(sim[rows, nn], 0.0) ** gamma
    W = np.minimum(A, A.T) if mutual else A + A.T
    d = W.sum(1)
    dinv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    return W, dinv[:, None] * W * dinv[None, :], nn


@pytest.fixture(scope="module")
def data():
    return clustered(300, d=16, centres=8)


@pytest.mark.parametrize("mutual", [True, False])
@pytest.mark.parametrize("gamma", [3.0, 1.0])
def test_matches_brute_force(data, mutual, gamma):
    g = G.knn_graph(data, k=10, gamma=gamma, mutual=mutual)
    W, S, _ = reference(data, 10, gamma, mutual)
    np.testing.assert_allclose(np.asarray(G.to_dense(g, normalized=False)), W, atol=1e-5)
    np.testing.assert_allclose(G.to_scipy(g).toarray(), S, atol=1e-5)
    np.testing.assert_allclose(np.asarray(G.to_bcoo(g).todense()), S, atol=1e-5)
    np.testing.assert_allclose(np.asarray(G.to_dense(g)), S, atol=1e-5)


def test_mutual_lists_are_symmetric_and_reciprocal(data):
    g = G.knn_graph(data, k=10)
    _, _, nn = reference(data, 10)
    ids, mask = np.asarray(g.ids), np.asarray(g.mask)
    a, w = np.asarray(g.affinity), np.asarray(g.weights)
    assert g.mask.shape == (300, 10)
    edges = {
        (i, ids[i, s]): (a[i, s], w[i, s]) for i in range(300) for s in range(10) if mask[i, s]
    }
    for (i, j), aw in edges.items():
        assert i != j
        assert j in nn[i] and i in nn[j]
        assert edges[(j, i)] == aw
    reciprocal = sum(1 for i in range(300) for j in nn[i] if i in nn[j])
    assert len(edges) == reciprocal
    assert (ids[~mask] == np.broadcast_to(np.arange(300)[:, None], ids.shape)[~mask]).all()
    assert (w[~mask] == 0).all() and (a[~mask] == 0).all()


def test_negative_similarities_clipped_and_isolated_nodes():
    # Points on a circle: with k = 5 of 8 points some neighbours have negative cosine.
    t = np.arange(8) * 2 * np.pi / 8
    X = np.stack([np.cos(t), np.sin(t)], 1).astype(np.float32)
    g = G.knn_graph(X, k=5)
    W, S, _ = reference(X, 5)
    assert (np.asarray(g.affinity) >= 0).all()
    assert not np.asarray(g.mask)[np.asarray(g.affinity) == 0].any()
    np.testing.assert_allclose(G.to_scipy(g).toarray(), S, atol=1e-6)
    # A lone outlier whose neighbours do not point back is isolated: zero row, no NaN.
    Y = np.concatenate([clustered(40, d=4, centres=2), [[0.6, 0.8, 0.0, 0.0]]]).astype(np.float32)
    g = G.knn_graph(Y, k=3)
    _, S, _ = reference(Y, 3)
    dense = np.asarray(G.to_dense(g))
    assert np.isfinite(dense).all()
    np.testing.assert_allclose(dense, S, atol=1e-6)
    assert (S.sum(1) == 0).any()


def test_duplicates_keep_zero_diagonal():
    X = np.repeat(clustered(20, d=8), 3, axis=0)
    g = G.knn_graph(X, k=4)
    ids = np.asarray(g.ids)
    rows = np.arange(len(X))[:, None]
    assert not (np.asarray(g.mask) & (ids == rows)).any()
    assert np.all(np.diag(np.asarray(G.to_dense(g))) == 0)


def test_chunking_does_not_change_the_graph(data):
    a = G.knn_graph(data, k=10)
    b = G.knn_graph(data, k=10, chunk_size=37, query_chunk_size=50)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.parametrize("mutual", [True, False])
def test_matvec(data, mutual):
    g = G.knn_graph(data, k=10, mutual=mutual)
    _, S, _ = reference(data, 10, mutual=mutual)
    rng = np.random.default_rng(1)
    f, F = rng.standard_normal(300), rng.standard_normal((300, 4))
    np.testing.assert_allclose(np.asarray(G.matvec(g, f.astype(np.float32))), S @ f, atol=1e-5)
    out = jax.jit(G.matvec)(g, F.astype(np.float32))
    np.testing.assert_allclose(np.asarray(out), S @ F, atol=1e-5)


@pytest.mark.parametrize("mutual", [True, False])
def test_subgraph_is_renormalised(data, mutual):
    g = G.knn_graph(data, k=10, mutual=mutual)
    W, _, _ = reference(data, 10, mutual=mutual)
    nodes = np.random.default_rng(2).permutation(300)[:120]
    Wn = W[np.ix_(nodes, nodes)]
    d = Wn.sum(1)
    dinv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    sub = jax.jit(G.subgraph)(g, jnp.asarray(nodes))
    np.testing.assert_allclose(np.asarray(G.to_dense(sub)), dinv[:, None] * Wn * dinv, atol=1e-5)


@pytest.mark.parametrize("mutual", [True, False])
def test_connected_components_vs_scipy(mutual):
    X = clustered(400, d=32, centres=25, spread=0.25, seed=3)
    g = G.knn_graph(X, k=4, mutual=mutual)
    n_ref, ref = scipy.sparse.csgraph.connected_components(G.to_scipy(g), directed=False)
    n, labels = jax.jit(G.connected_components)(g)
    assert n_ref > 3
    assert int(n) == n_ref
    labels = np.asarray(labels)
    # Same partition, components numbered by their smallest node.
    first = {c: np.flatnonzero(labels == c)[0] for c in range(n_ref)}
    assert sorted(first.values()) == [first[c] for c in range(n_ref)]
    pairs = set(zip(labels, ref, strict=True))
    assert len(pairs) == n_ref


def test_knn_graph_under_jit(data):
    a = G.knn_graph(data, k=10)
    b = jax.jit(lambda x: G.knn_graph(x, k=10, validate=False))(data)
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), atol=1e-6)


def test_low_precision_input(data):
    g = G.knn_graph(jnp.asarray(data, jnp.bfloat16), k=10)
    assert g.weights.dtype == jnp.float32
    dense = np.asarray(G.to_dense(g))
    assert np.isfinite(dense).all() and np.allclose(dense, dense.T)


@pytest.mark.parametrize(
    "X, kwargs, match",
    [
        (np.zeros(5, np.float32), {}, "X: expected descriptors"),
        (np.zeros((5, 3), np.int32), {}, "X: expected a floating"),
        (np.zeros((0, 3), np.float32), {}, "X: expected at least one"),
        (np.full((5, 3), np.nan, np.float32), {}, "X: contains"),
        (np.ones((5, 3), np.float32), {"k": 5}, "k: expected at most"),
        (np.ones((5, 3), np.float32), {"k": 0}, "k: expected a positive"),
        (np.ones((5, 3), np.float32), {"k": 2, "gamma": 0.0}, "gamma"),
        (np.ones((5, 3), np.float32), {"k": 2, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input(X, kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.knn_graph(X, **kwargs)


def test_save_load_round_trip(tmp_path, data):
    for mutual in (True, False):
        g = G.knn_graph(data, k=10, mutual=mutual)
        path = tmp_path / "g.npz"
        G.save(g, path)
        h = G.load(path)
        assert h.mutual == mutual
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(h), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        G.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable jret file"):
        G.load(bad)
    other = tmp_path / "other.npz"
    G.write_npz(other, "fsr", {"U": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="kind graph"):
        G.load(other)
    truncated = tmp_path / "truncated.npz"
    G.write_npz(truncated, "graph", {"ids": np.zeros((2, 2), np.int32)})
    with pytest.raises(ValueError, match="missing 'affinity'"):
        G.load(truncated)
    old = tmp_path / "old.npz"
    np.savez(old, jret_kind="graph", jret_version=G.FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="format version"):
        G.load(old)


def test_sharded_construction_on_8_devices():
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import Mesh
        from jret import graph as G
        assert len(jax.devices()) == 8
        rng = np.random.default_rng(0)
        X = rng.standard_normal((203, 16)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        mesh = Mesh(np.array(jax.devices()), ("db",))
        a = G.knn_graph(X, k=7)
        b = G.knn_graph(X, k=7, mesh=mesh, query_chunk_size=64)
        np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
        np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), atol=1e-6)
        print("ok")
        """
    )
    run_on_devices(code)
