"""jret.whitening against numpy transcriptions of PCA-whitening and Lw."""

import jax
import numpy as np
import pytest

from jret import whitening
from jret.normalize import l2n, power_norm

RNG = np.random.default_rng(1)


def unit_rows(n, d, rng=RNG):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n_clusters=40, per=6, d=16, spread=0.3):
    centers = RNG.normal(size=(n_clusters, d))
    X = np.repeat(centers, per, 0) + spread * RNG.normal(size=(n_clusters * per, d))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    labels = np.repeat(np.arange(n_clusters), per)
    q = np.arange(0, len(X), per)
    return X, labels, q, q + 1


def test_l2n_and_power_norm():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2n(x), [[3 / (5 + 1e-6), 4 / (5 + 1e-6)], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(power_norm(np.array([-4.0, 9.0]), 0.5), [-2.0, 3.0])
    with pytest.raises(ValueError, match="floating"):
        l2n(np.ones((2, 2), np.int32))


def test_pca_whitening_decorrelates():
    X = unit_rows(500, 12) @ RNG.normal(size=(12, 12)).astype(np.float32)
    w = whitening.pca_whiten_learn(X)
    Y = (X - np.asarray(w.m)) @ np.asarray(w.P).T
    np.testing.assert_allclose(np.cov(Y.T, bias=True), np.eye(12), atol=1e-3)
    # Transcription: P = Λ^{-s/2} Eᵀ with the eigenvalues in descending order.
    Xd = X.astype(np.float64)
    C = np.cov(Xd.T, bias=True)
    lam, E = np.linalg.eigh(C)
    lam, E = lam[::-1], E[:, ::-1]
    P_ref = np.diag(lam**-0.25) @ E.T
    P = np.asarray(whitening.pca_whiten_learn(X, shrinkage=0.5).P)
    np.testing.assert_allclose(np.abs(P), np.abs(P_ref), rtol=1e-3, atol=1e-4)
    assert whitening.pca_whiten_learn(X, dims=5).P.shape == (5, 12)


def test_pca_whitening_from_accumulated_moments():
    """The streaming form: mean and covariance summed in float64 over chunks give the same
    whitening as the whole matrix."""
    X = (unit_rows(900, 16) @ RNG.normal(size=(16, 16)) + 3.0).astype(np.float32)
    count, total, outer = 0, 0.0, 0.0
    for chunk in np.array_split(X.astype(np.float64), 7):
        count, total, outer = count + len(chunk), total + chunk.sum(0), outer + chunk.T @ chunk
    m = total / count
    got = whitening.pca_whiten_from_moments(m, outer / count - np.outer(m, m), 1.0, dims=10)
    ref = whitening.pca_whiten_learn(X, dims=10)
    np.testing.assert_allclose(np.asarray(got.m), np.asarray(ref.m), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.asarray(got.P)), np.abs(np.asarray(ref.P)), rtol=1e-4)
    with pytest.raises(ValueError, match=r"m, C: expected \(D,\) and \(D, D\)"):
        whitening.pca_whiten_from_moments(m, np.eye(3))


def test_lw_cirtorch_transcription():
    X, _, q, p = clustered()
    Xd = X.astype(np.float64)
    m = Xd[q].mean(0)
    df = Xd[q] - Xd[p]
    S = df.T @ df / len(q)
    P1 = np.linalg.inv(np.linalg.cholesky(S))
    Z = P1 @ (Xd - m).T
    lam, V = np.linalg.eigh(Z @ Z.T)
    V = V[:, np.argsort(lam)[::-1]]
    P_ref = V.T @ P1
    w = whitening.lw_learn(X, q, p)
    np.testing.assert_allclose(np.asarray(w.m), m, rtol=1e-5, atol=1e-7)
    # Eigenvectors are defined up to sign: compare row by row up to ±1.
    P = np.asarray(w.P, np.float64)
    signs = np.sign((P * P_ref).sum(1, keepdims=True))
    np.testing.assert_allclose(P * signs, P_ref, rtol=1e-3, atol=1e-3 * np.abs(P_ref).max())


def test_lw_whitens_matching_differences():
    """After Lw the matching-pair scatter is the identity (the defining property)."""
    X, _, q, p = clustered()
    for variant in ("cirtorch", "paper"):
        w = whitening.lw_learn(X, q, p, variant=variant)
        P = np.asarray(w.P, np.float64)
        d = (X[q] - X[p]).astype(np.float64) @ P.T
        np.testing.assert_allclose(d.T @ d / len(q), np.eye(X.shape[1]), atol=2e-3)


def test_lw_paper_with_negative_pairs_orders_by_discrimination():
    X, labels, q, p = clustered()
    a = np.arange(0, len(X) - 6, 3)
    b = (a + 13) % len(X)
    keep = labels[a] != labels[b]
    w = whitening.lw_learn(X, q, p, variant="paper", neg_pairs=(a[keep], b[keep]))
    P = np.asarray(w.P, np.float64)
    dn = (X[a[keep]] - X[b[keep]]).astype(np.float64) @ P.T
    var = (dn**2).mean(0)
    assert np.all(np.diff(var) <= 1e-6), "rows must be sorted by decreasing inter-class variance"


def test_lw_improves_matching(tmp_path):
    """Lw on clustered data pulls matching pairs closer relative to non-matching ones."""
    X, labels, q, p = clustered(spread=0.6)
    w = whitening.lw_learn(X, q, p)
    Y = np.asarray(whitening.whiten_apply(X, w))

    def margin(Z):
        S = Z @ Z.T
        same = labels[:, None] == labels[None]
        np.fill_diagonal(same, False)
        return S[same].mean() - S[labels[:, None] != labels[None]].mean()

    assert margin(Y) > margin(X)


def test_whiten_apply_matches_transcription_and_shapes():
    X, _, q, p = clustered()
    w = whitening.lw_learn(X, q, p)
    ref = (X - np.asarray(w.m)) @ np.asarray(w.P)[:8].T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6
    np.testing.assert_allclose(whitening.whiten_apply(X, w, dims=8), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(whitening.whiten_apply, static_argnums=2)(X, w, 8), ref, rtol=1e-4, atol=1e-6
    )
    reg = X.reshape(20, 12, 16)
    assert whitening.whiten_apply(reg, w).shape == (20, 12, 16)


def test_whitening_is_a_pytree():
    w = whitening.pca_whiten_learn(unit_rows(50, 4))
    leaves = jax.tree_util.tree_leaves(w)
    assert len(leaves) == 2 and w.dim == 4


def test_rank_deficient_pairs_use_jitter():
    X = unit_rows(30, 8)
    q = np.array([0, 1, 2])
    p = np.array([3, 4, 5])
    w = whitening.lw_learn(X, q, p)
    assert np.isfinite(np.asarray(w.P)).all()


def test_bad_input():
    X = unit_rows(20, 4)
    with pytest.raises(ValueError, match="X: expected descriptors"):
        whitening.pca_whiten_learn(X[0])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        whitening.pca_whiten_learn(bad)
    with pytest.raises(ValueError, match="X: expected at least one"):
        whitening.pca_whiten_learn(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="same length"):
        whitening.lw_learn(X, np.array([0, 1]), np.array([2]))
    with pytest.raises(ValueError, match=r"pidx: indices must lie in \[0, 20\)"):
        whitening.lw_learn(X, np.array([0]), np.array([20]))
    with pytest.raises(ValueError, match="qidx: expected an integer"):
        whitening.lw_learn(X, np.array([0.0]), np.array([1]))
    with pytest.raises(ValueError, match="variant"):
        whitening.lw_learn(X, np.array([0]), np.array([1]), variant="other")
    with pytest.raises(ValueError, match="dims"):
        whitening.pca_whiten_learn(X, dims=9)
    w = whitening.pca_whiten_learn(X)
    with pytest.raises(ValueError, match="last dimension 4"):
        whitening.whiten_apply(unit_rows(3, 5), w)
