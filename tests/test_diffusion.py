"""jret.diffusion against dense numpy solves, scipy CG and numpy transcriptions of the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

from jret import diffusion as D
from jret import graph as G

ALPHA = 0.99


def clustered(n, d=16, centres=8, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near(X, m, seed, noise=0.3):
    """``m`` queries: perturbed database items, ℓ2-normalised."""
    rng = np.random.default_rng(seed)
    q = X[rng.choice(len(X), m, replace=False)] + noise * rng.standard_normal((m, X.shape[1]))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def y_reference(Q, X, kq, gamma=3.0):
    """Eq. 7: the kq nearest database items of each query with ``max(s, 0)^γ``, dense."""
    sim = Q.astype(np.float64) @ X.T.astype(np.float64)
    y = np.zeros_like(sim)
    for i, row in enumerate(sim):
        nn = np.argsort(-row, kind="stable")[:kq]
        y[i, nn] = np.maximum(row[nn], 0) ** gamma
    return y


def exact(S, y, alpha=ALPHA):
    """``(1 − α)(I − αS)^{-1} y`` for the rows of ``y`` by a dense solve."""
    n = S.shape[0]
    return np.linalg.solve(np.eye(n) - alpha * S, (1 - alpha) * y.T).T


def scatter(scores, ids, n):
    out = np.zeros((scores.shape[0], n))
    np.put_along_axis(out, np.asarray(ids), np.asarray(scores), axis=1)
    return out


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def setup():
    """600 nodes in several components (small k), one isolated node at least, 7 queries."""
    X = clustered(600, d=16, centres=12, spread=0.45, seed=0)
    Q = near(X, 7, seed=5)
    g = G.knn_graph(X, k=8)
    S = G.to_scipy(g).toarray().astype(np.float64)
    return X, Q, g, S


def test_setup_has_components_and_isolated_nodes(setup):
    _, _, g, S = setup
    assert int(G.connected_components(g)[0]) > 1
    assert (S.sum(1) == 0).any()


def test_query_vector_global(setup):
    X, Q, _, _ = setup
    vals, ids = D.query_vector(Q, X, kq=10)
    np.testing.assert_allclose(
        np.asarray(D.densify(vals, ids, 600)), y_reference(Q, X, 10), atol=1e-6
    )


@pytest.mark.parametrize("power", ["before_sum", "after_sum"])
def test_query_vector_regional(setup, power):
    X, _, _, _ = setup
    R = near(X, 12, seed=9).reshape(3, 4, 16)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    vals, ids = D.query_vector(R, X, kq=15, q_mask=mask, power=power)
    got = np.asarray(D.densify(vals, ids, 600))
    for i in range(3):
        y = np.zeros(600)
        for r in np.flatnonzero(mask[i]):
            sim = X.astype(np.float64) @ R[i, r]
            nn = np.argsort(-sim, kind="stable")[:15]
            y[nn] += np.maximum(sim[nn], 0) ** 3 if power == "before_sum" else sim[nn]
        member = np.zeros(600, bool)
        for r in np.flatnonzero(mask[i]):
            member[np.argsort(-(X @ R[i, r]), kind="stable")[:15]] = True
        top = np.argsort(-np.where(member, y, -np.inf), kind="stable")[:15]
        ref = np.zeros(600)
        ref[top] = y[top] if power == "before_sum" else np.maximum(y[top], 0) ** 3
        np.testing.assert_allclose(got[i], ref, atol=1e-5)


def test_cg_equals_dense_solve(setup):
    X, Q, g, S = setup
    y = y_reference(Q, X, 10)
    f = np.asarray(D.diffuse(g, y.astype(np.float32)))
    assert rel(f, exact(S, y)) < 1e-4


@pytest.mark.parametrize("iters", [3, 20])
def test_cg_equals_scipy_cg(setup, iters):
    X, Q, g, _ = setup
    y = y_reference(Q, X, 10)
    L = scipy.sparse.identity(600) - ALPHA * G.to_scipy(g).astype(np.float64)
    ref = np.stack(
        [scipy.sparse.linalg.cg(L, (1 - ALPHA) * b, rtol=1e-6, maxiter=iters)[0] for b in y]
    )
    f = np.asarray(D.diffuse(g, y.astype(np.float32), iters=iters))
    assert rel(f, ref) < 1e-4


def test_jacobi_is_the_neumann_series(setup):
    X, Q, g, S = setup
    y = y_reference(Q, X, 10)
    ref, term = np.zeros_like(y), (1 - ALPHA) * y
    for _ in range(7):
        ref, term = ref + term, ALPHA * term @ S.T
    f = np.asarray(D.diffuse(g, y.astype(np.float32), iters=7, solver="jacobi"))
    assert rel(f, ref) < 1e-5
    long = np.asarray(D.diffuse(g, y.astype(np.float32), iters=3000, tol=1e-7, solver="jacobi"))
    assert rel(long, exact(S, y)) < 1e-4


def test_diffuse_batched_vmapped_and_looped_agree(setup):
    X, Q, g, _ = setup
    y = y_reference(Q, X, 10).astype(np.float32)
    batched = np.asarray(D.diffuse(g, y, iters=5))
    loop = np.concatenate([np.asarray(D.diffuse(g, y[i : i + 1], iters=5)) for i in range(7)])
    np.testing.assert_allclose(batched, loop, atol=1e-6)
    mapped = jax.jit(jax.vmap(lambda row: D.diffuse(g, row[None], iters=5)[0]))(y)
    np.testing.assert_allclose(batched, np.asarray(mapped), atol=1e-6)


def expected_ranking(f, key):
    """Reached items (f > 0) by decreasing f, then the rest by decreasing key."""
    out = []
    for fr, kr in zip(f, key, strict=True):
        reached = np.flatnonzero(fr > 0)
        rest = np.flatnonzero(fr <= 0)
        out.append(
            np.concatenate(
                [
                    reached[np.argsort(-fr[reached], kind="stable")],
                    rest[np.argsort(-kr[rest], kind="stable")],
                ]
            )
        )
    return np.stack(out)


def test_search_end_to_end(setup):
    X, Q, g, S = setup
    f = exact(S, y_reference(Q, X, 10))
    scores, ids = D.search(Q, X, g, kq=10, k=600, iters=200, tol=1e-8, query_block=3)
    ref = expected_ranking(f, Q @ X.T)
    assert ((f > 1e-7) == (f > 0)).all()  # no ambiguous near-zero scores
    np.testing.assert_array_equal(np.asarray(ids), ref)
    np.testing.assert_allclose(scatter(scores, ids, 600), f, atol=1e-6)
    assert (f <= 0).any(axis=1).all()  # every query leaves some items unreached
    _, plain = D.search(Q, X, g, kq=10, k=50, fallback=False)
    np.testing.assert_array_equal(np.asarray(plain)[:, :5], ref[:, :5])


def test_truncated_diffusion(setup):
    X, Q, g, _ = setup
    W = G.to_scipy(g, normalized=False).toarray().astype(np.float64)
    y = y_reference(Q, X, 10)
    sims = Q @ X.T
    _, ids = D.search(Q, X, g, kq=10, k=600, truncate=150, iters=300, tol=1e-9)
    for i in range(len(Q)):
        nodes = np.argsort(-sims[i], kind="stable")[:150]
        Wn = W[np.ix_(nodes, nodes)]
        d = Wn.sum(1)
        dinv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
        f_local = exact(dinv[:, None] * Wn * dinv, y[i : i + 1, nodes])[0]
        f = np.zeros(600)
        f[nodes] = f_local
        ref = expected_ranking(f[None], sims[i : i + 1])[0]
        got = np.asarray(ids[i])
        n_reached = int((f > 0).sum())
        np.testing.assert_array_equal(got[:n_reached], ref[:n_reached])
        np.testing.assert_array_equal(np.sort(got[:150]), np.sort(nodes))
        np.testing.assert_array_equal(got[150:], ref[150:])


def test_gmp_weights():
    rng = np.random.default_rng(4)
    regions = rng.standard_normal((5, 6, 8)).astype(np.float32)
    mask = rng.random((5, 6)) > 0.3
    mask[:, 0] = True
    w = np.asarray(D.gmp_weights(regions, mask))
    for i in range(5):
        phi = regions[i][mask[i]].astype(np.float64)
        ref = np.linalg.solve(phi @ phi.T + np.eye(len(phi)), np.ones(len(phi)))
        np.testing.assert_allclose(w[i][mask[i]], ref, rtol=1e-4, atol=1e-5)
        assert (w[i][~mask[i]] == 0).all()


def test_regional_diffusion_with_pooling():
    regions = clustered(80 * 3, d=16, centres=6, seed=7).reshape(80, 3, 16)
    rmask = np.ones((80, 3), bool)
    rmask[::4, 2] = False
    weights = D.gmp_weights(regions, rmask)
    nodes, pooling = D.flatten_regions(regions, rmask, weights)
    node_image, node_w = np.asarray(pooling.node_image), np.asarray(pooling.node_weights)
    assert len(nodes) == rmask.sum() and pooling.n_images == 80
    np.testing.assert_array_equal(node_image, np.nonzero(rmask)[0])
    np.testing.assert_array_equal(node_w, np.asarray(weights)[rmask])
    g = G.knn_graph(nodes, k=10)
    S = G.to_scipy(g).toarray().astype(np.float64)
    Qr = near(nodes, 8, seed=8).reshape(4, 2, 16)
    qmask = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool)
    scores, ids = D.search(
        Qr, nodes, g, kq=20, k=80, iters=300, tol=1e-9, q_mask=qmask, pooling=pooling
    )
    y = np.asarray(D.densify(*D.query_vector(Qr, nodes, kq=20, q_mask=qmask), len(nodes)))
    f = exact(S, y)
    img = np.zeros((4, 80))
    np.add.at(img.T, node_image, (f * node_w).T)
    key = np.full((4, 80), -np.inf)
    sims = np.where(qmask[..., None], np.einsum("qrd,nd->qrn", Qr, nodes), -np.inf).max(1)
    np.maximum.at(key.T, node_image, sims.T)
    np.testing.assert_array_equal(np.asarray(ids), expected_ranking(img, key))
    np.testing.assert_allclose(scatter(scores, ids, 80), img, atol=1e-6)
    model = D.fsr_fit(g, rank=None, method="exact")
    scores, ids = D.fsr_search(model, Qr, nodes, kq=20, k=80, q_mask=qmask, pooling=pooling)
    np.testing.assert_allclose(scatter(scores, ids, 80), img, atol=1e-5)


def test_image_pooling_checks():
    with pytest.raises(ValueError, match="node_image: expected an integer"):
        D.image_pooling(np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="node_image: ids must lie"):
        D.image_pooling(np.full(6, 3), n_images=2)
    with pytest.raises(ValueError, match="node_weights: expected 6"):
        D.image_pooling(np.zeros(6, np.int32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="node_weights: contains"):
        D.image_pooling(np.zeros(6, np.int32), np.full(6, np.nan, np.float32))
    pooling = D.image_pooling(np.array([0, 0, 2]))
    assert pooling.n_images == 3 and np.asarray(pooling.node_weights).tolist() == [1.0] * 3


def test_fsr_full_rank_equals_exact_diffusion(setup):
    X, Q, g, S = setup
    model = D.fsr_fit(g, rank=None, method="exact")
    assert bool(model.isolated.any())
    scores, ids = D.fsr_search(model, Q, X, kq=10, k=600, fallback=False)
    assert rel(scatter(scores, ids, 600), exact(S, y_reference(Q, X, 10))) < 1e-4


def test_fsr_rank_r_equals_the_truncated_eigen_expansion(setup):
    X, Q, g, S = setup
    _, labels = G.connected_components(g)
    labels = np.asarray(labels)
    big = labels == np.argmax(np.bincount(labels))
    lam, V = np.linalg.eigh(S[np.ix_(big, big)])
    lam, V = lam[::-1][:25], V[:, ::-1][:, :25]
    y = y_reference(Q, X, 10)
    ref = y.copy()  # nodes outside the decomposed component keep y
    ref[:, big] = y[:, big] @ V @ np.diag((1 - ALPHA) / (1 - ALPHA * lam)) @ V.T
    model = D.fsr_fit(g, rank=25, method="exact", components="largest")
    np.testing.assert_allclose(np.asarray(model.lam), lam, atol=1e-6)
    scores, ids = D.fsr_search(model, Q, X, kq=10, k=600, fallback=False)
    np.testing.assert_allclose(scatter(scores, ids, 600), ref, atol=1e-6)


def test_fsr_arbitrary_transfer_function(setup):
    X, Q, g, S = setup
    model = D.fsr_fit(g, rank=None, method="exact")
    scores, ids = D.fsr_search(model, Q, X, kq=10, k=600, h=jnp.square, fallback=False)
    y = y_reference(Q, X, 10)
    np.testing.assert_allclose(scatter(scores, ids, 600), y @ (S @ S).T, atol=1e-5)


@pytest.mark.parametrize("method", ["lanczos", "approx"])
def test_fsr_large_graph_methods_find_the_top_eigenpairs(method):
    X = clustered(200, d=16, centres=3, spread=1.0, seed=11)
    g = G.knn_graph(X, k=20)
    _, labels = G.connected_components(g)
    big = np.asarray(labels) == np.argmax(np.bincount(np.asarray(labels)))
    S = G.to_scipy(g).toarray().astype(np.float64)[np.ix_(big, big)]
    ref = np.linalg.eigvalsh(S)[::-1][:10]
    opts = D.EigOptions(lanczos_steps=150) if method == "lanczos" else D.EigOptions(oversample=190)
    model = D.fsr_fit(g, rank=10, method=method, components="largest", options=opts)
    lam = np.asarray(model.lam)
    np.testing.assert_allclose(lam, ref, atol=1e-4)
    U = np.asarray(model.U, np.float64)
    assert not U[~big].any()
    U = U[big]
    np.testing.assert_allclose(U.T @ U, np.eye(10), atol=1e-3)
    np.testing.assert_allclose(S @ U, U * lam, atol=2e-3)


def test_fsr_largest_component_copies_y_elsewhere(setup):
    X, Q, g, S = setup
    _, labels = G.connected_components(g)
    labels = np.asarray(labels)
    big = labels == np.argmax(np.bincount(labels))
    model = D.fsr_fit(g, rank=None, components="largest")
    assert np.array_equal(np.asarray(model.covered), big)
    Q = np.concatenate([Q, near(X[big], 3, seed=6)])
    y = y_reference(Q, X, 10)
    assert y[:, big].any() and y[:, ~big].any()
    scores, ids = D.fsr_search(model, Q, X, kq=10, k=600, fallback=False)
    x = scatter(scores, ids, 600)
    Sb = S[np.ix_(big, big)]
    np.testing.assert_allclose(x[:, ~big], y[:, ~big], atol=1e-6)
    assert rel(x[:, big], exact(Sb, y[:, big])) < 1e-4


def test_fsr_per_component_rule_and_sparsity(setup):
    _, _, g, _ = setup
    _, labels = G.connected_components(g)
    sizes = np.bincount(np.asarray(labels))
    model = D.fsr_fit(g, rank=60, rho=5, method="exact")
    U = np.asarray(model.U)
    comp_of_col = np.asarray(labels)[np.argmax(np.abs(U), axis=0)]
    per = np.bincount(comp_of_col, minlength=len(sizes))
    assert (per[sizes > 1] >= np.minimum(5, sizes[sizes > 1])).all()
    assert U.shape[1] == max(60, int(np.minimum(5, sizes[sizes > 1]).sum()))
    lam = np.asarray(model.lam)
    assert (np.diff(lam) <= 0).all()
    sparse = D.fsr_fit(g, rank=60, rho=5, method="exact", tau=500)
    assert int((np.asarray(sparse.U) != 0).sum()) == 500
    kept = np.abs(U)[np.asarray(sparse.U) != 0]
    assert kept.min() >= np.abs(U)[np.asarray(sparse.U) == 0].max()


def test_fsrw(setup):
    X, Q, g, _ = setup
    model = D.fsr_fit(g, rank=30, method="exact")
    a, ia = D.fsr_search(model, Q, X, k=600, fallback=False)
    b, ib = D.fsr_search(model, Q, X, k=600, fallback=False, fsrw=True)
    eta = np.linalg.norm(np.asarray(model.U), axis=1)
    expected = scatter(a, ia, 600) + (1 - eta) * (Q @ X.T)
    np.testing.assert_allclose(scatter(b, ib, 600), expected, atol=1e-5)


def hybrid_case(n, rank, seed):
    X = clustered(n, d=32, centres=30, spread=0.8, seed=seed)
    Q = near(X, 6, seed=seed + 1)
    g = G.knn_graph(X)
    model = D.hybrid_fit(g, rank=rank)
    scores, ids = D.hybrid_search(model, Q, X, k=n, fallback=False)
    S = G.to_scipy(g).toarray().astype(np.float64)
    return rel(scatter(scores, ids, n), exact(S, y_reference(Q, X, 5)))


def test_hybrid_equals_exact_small():
    # The defaults' rank 400 would cover most of a small graph: scale it down.
    assert hybrid_case(600, 150, seed=12) < 1e-3


@pytest.mark.slow
def test_hybrid_equals_exact_at_defaults_2000_nodes():
    assert hybrid_case(2000, 400, seed=13) < 1e-3


def test_hybrid_extremes(setup):
    X, Q, g, S = setup
    y = y_reference(Q, X, 5)
    full = D.hybrid_fit(g, rank=600, components="all", method="exact")
    scores, ids = D.hybrid_search(full, Q, X, k=600, iters=1, fallback=False)
    assert rel(scatter(scores, ids, 600), exact(S, y)) < 1e-4
    low = D.hybrid_fit(g, rank=1)
    scores, ids = D.hybrid_search(low, Q, X, k=600, iters=300, tol=1e-9, fallback=False)
    assert rel(scatter(scores, ids, 600), exact(S, y)) < 1e-4


def seeded_reference(S, ids, inliers, sims, kq, n_seeds=10):
    y = np.zeros((len(ids), S.shape[0]))
    for i in range(len(ids)):
        inl, sim, idx = inliers[i, :n_seeds], sims[i, :n_seeds], ids[i, :n_seeds]
        y1 = inl / inl.max() if inl.max() > 0 else np.zeros_like(inl, dtype=float)
        score = y1 * sim
        keep = np.argsort(-score, kind="stable")[:kq]
        yi = np.zeros(len(idx))
        yi[keep] = score[keep]
        if not yi.any():
            yi = y1
        y[i, idx] += yi
    return exact(S, y)


def test_seeded_diffusion(setup):
    X, Q, g, S = setup
    sims_all = Q @ X.T
    ids = np.argsort(-sims_all, axis=1, kind="stable")[:, :100]
    rng = np.random.default_rng(3)
    inliers = rng.integers(0, 40, ids.shape)
    inliers[0] = 0  # no verified image: scores are all zero
    sims = np.take_along_axis(sims_all, ids, 1).astype(np.float32)
    sims[1] = 0.0  # y1 ⊙ sim all zero: fall back to y1
    for ref_compat, kq in ((False, 5), (True, 4)):
        scores, out = D.seeded(
            g,
            ids,
            inliers,
            sims,
            k=600,
            iters=300,
            tol=1e-9,
            ref_compat=ref_compat,
            fallback_scores=sims_all,
        )
        f = seeded_reference(S, ids, inliers, sims, kq)
        np.testing.assert_allclose(scatter(scores, out, 600), f, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out), expected_ranking(f, sims_all))


def test_models_save_load_round_trip(tmp_path, setup):
    X, Q, g, _ = setup
    fsr = D.fsr_fit(g, rank=40, method="exact", tau=2000)
    hyb = D.hybrid_fit(g, rank=40, alpha=0.9)
    for model, search in ((fsr, D.fsr_search), (hyb, D.hybrid_search)):
        path = tmp_path / "model.npz"
        D.save(model, path)
        loaded = D.load(path)
        assert type(loaded) is type(model) and loaded.alpha == model.alpha
        for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(loaded), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(
            np.asarray(search(model, Q, X, k=20)[1]), np.asarray(search(loaded, Q, X, k=20)[1])
        )
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_model_load_errors(tmp_path, setup):
    _, _, g, _ = setup
    with pytest.raises(FileNotFoundError):
        D.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable"):
        D.load(bad)
    G.save(g, tmp_path / "graph.npz")
    with pytest.raises(ValueError, match="kind fsr or hybrid"):
        D.load(tmp_path / "graph.npz")
    G.write_npz(tmp_path / "broken.npz", "fsr", {"U": np.zeros((5, 2)), "lam": np.zeros(3)})
    with pytest.raises(ValueError, match="corrupt"):
        D.load(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="model: expected"):
        D.save(g, tmp_path / "x.npz")


def test_query_block_does_not_change_the_result(setup):
    X, Q, g, _ = setup
    a = D.search(Q, X, g, k=50, query_block=1)
    b = D.search(Q, X, g, k=50, query_block=7)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"Q": np.zeros((2, 3, 4, 16), np.float32)}, "Q: expected"),
        ({"Q": np.zeros((2, 8), np.float32)}, "dimension mismatch"),
        ({"Q": np.full((2, 16), np.nan, np.float32)}, "Q: contains"),
        ({"X": np.zeros((10, 16), np.float32)}, "X: expected 600 rows"),
        ({"kq": 601}, "kq: expected at most"),
        ({"k": 601}, "k: expected at most"),
        ({"alpha": 1.0}, "alpha"),
        ({"solver": "gmres"}, "solver"),
        ({"power": "inside"}, "power"),
        ({"truncate": 5}, "truncate"),
        ({"q_mask": np.ones((2, 3), bool)}, "q_mask"),
        ({"pooling": D.image_pooling(np.zeros(10, np.int32))}, "pooling: expected 600 nodes"),
        ({"k": 2, "pooling": D.image_pooling(np.zeros(600, np.int32))}, "k: expected at most 1"),
    ],
)
def test_search_bad_input(setup, kwargs, match):
    X, Q, g, _ = setup
    args = {"Q": Q[:2], "X": X, **kwargs}
    with pytest.raises(ValueError, match=match):
        D.search(args.pop("Q"), args.pop("X"), g, **args)


def test_other_bad_input(setup):
    X, Q, g, _ = setup
    with pytest.raises(ValueError, match="fsrw"):
        D.fsr_search(D.fsr_fit(g, rank=5), Q[:, None, :], X, fsrw=True)
    with pytest.raises(ValueError, match="method"):
        D.fsr_fit(g, method="svd")
    with pytest.raises(ValueError, match="components"):
        D.hybrid_fit(g, components="some")
    with pytest.raises(ValueError, match="oversample"):
        D.EigOptions(oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        D.EigOptions(power_iters=0)
    with pytest.raises(ValueError, match="rank"):
        D.fsr_fit(g, rank=0)
    with pytest.raises(ValueError, match="sparsity"):
        D.hybrid_fit(g, rank=5, sparsity=1.0)
    with pytest.raises(ValueError, match="y: expected 600 columns"):
        D.diffuse(g, np.zeros((2, 5), np.float32))
    ids = np.zeros((2, 10), np.int32)
    with pytest.raises(ValueError, match="ids: expected database ids"):
        D.seeded(g, ids + 600, np.ones((2, 10)), np.ones((2, 10), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        D.seeded(g, ids, np.ones((2, 9)), np.ones((2, 10), np.float32))


def chains(n_land=8, length=14, step=0.12, dim=32, decoys=6, seed=0):
    """Landmarks on curved 1-D manifolds, queries at one end, decoys near the query off the
    manifold: kNN ranks the decoys above the far end of the curve, diffusion follows it."""
    rng = np.random.default_rng(seed)
    X, Q, gnd = [], [], []
    for _ in range(n_land):
        u, v = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
        t = step * np.arange(length)
        noise = 0.02 * rng.standard_normal((length, dim))
        ids = np.arange(len(X), len(X) + length)
        X.extend(np.cos(t)[:, None] * u + np.sin(t)[:, None] * v + noise)
        Q.append(u + 0.02 * rng.standard_normal(dim))
        w = rng.standard_normal((decoys, dim))
        w -= np.outer(w @ u, u) + np.outer(w @ v, v)
        X.extend(0.55 * u + 0.835 * w / np.linalg.norm(w, axis=1, keepdims=True))
        gnd.append({"easy": ids[:4], "hard": ids[4:], "junk": np.zeros(0, int)})
    X, Q = np.asarray(X, np.float32), np.asarray(Q, np.float32)
    return Q / np.linalg.norm(Q, axis=1)[:, None], X / np.linalg.norm(X, axis=1)[:, None], gnd


def test_stage_rows_use_the_whitened_descriptors_and_beat_knn_on_a_manifold():
    import pathlib
    import sys
    from types import SimpleNamespace

    from jret import experiment
    from jret.evaluate import evaluate_revisited, ranks_from_ids
    from jret.pipeline import GlobalDescriptors
    from jret.search import knn

    repo = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "experiments"))
    try:
        import diffusion_stages
    finally:
        sys.path.pop(0)
    config = experiment.load_config(repo / "configs" / "diffusion_synth.py")
    assert config.diffusion == diffusion_stages.default_config()
    config.diffusion.update(k=5, gamma=3.0, kq=10, hybrid_kq=5, fsr_rank=50, hybrid_rank=20)
    Q, X, gnd = chains()
    noise = near(X, len(Q), seed=1), clustered(len(X), d=32, seed=2)
    desc = GlobalDescriptors(*noise, Q, X, None, {})
    rows = diffusion_stages.stage_rows(config, SimpleNamespace(gnd=gnd), None, None, None, desc)
    assert list(rows) == ["diffusion", "FSR", "hybrid"]
    plain = evaluate_revisited(ranks_from_ids(np.asarray(knn(Q, X, k=len(X))[1])), gnd)
    assert plain["hard"]["map"] < 0.7
    for res in rows.values():
        assert res["hard"]["map"] > 0.95 and set(res) == {"easy", "medium", "hard"}
    unwhitened = GlobalDescriptors(Q, X, None, None, None, {})
    same = diffusion_stages.stage_rows(
        config, SimpleNamespace(gnd=gnd), None, None, None, unwhitened
    )
    for name in rows:
        np.testing.assert_array_equal(same[name]["hard"]["aps"], rows[name]["hard"]["aps"])
