"""jret.qe against brute-force numpy transcriptions of AQE, αQE and DBA."""

import jax
import numpy as np
import pytest

from jret import qe

RNG = np.random.default_rng(2)


def unit_rows(n, d):
    x = RNG.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def l2n(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def np_alpha_qe(Q, X, k, alpha, include_query=True):
    out = []
    for q in Q.astype(np.float64):
        s = X @ q
        top = np.argsort(-s, kind="stable")[:k]
        w = np.ones(k) if alpha == 0 else np.maximum(s[top], 0) ** alpha
        out.append((q if include_query else 0) + (w[:, None] * X[top]).sum(0))
    return l2n(np.array(out))


def np_dba(X, k, alpha):
    out = []
    for i, x in enumerate(X.astype(np.float64)):
        s = X @ x
        order = [j for j in np.argsort(-s, kind="stable") if j != i][:k]
        w = np.maximum(s[order], 0) ** alpha
        out.append(x + (w[:, None] * X[order]).sum(0))
    return l2n(np.array(out))


@pytest.fixture
def data():
    X = unit_rows(300, 32)
    Q = l2n(X[:12] + 0.3 * unit_rows(12, 32)).astype(np.float32)
    return Q, X


@pytest.mark.parametrize("k,alpha", [(50, 3.0), (1, 3.0), (10, 0.5), (300, 3.0)])
def test_alpha_qe(data, k, alpha):
    Q, X = data
    np.testing.assert_allclose(
        qe.alpha_qe(Q, X, k=k, alpha=alpha), np_alpha_qe(Q, X, k, alpha), atol=2e-5
    )


def test_alpha_qe_defaults_and_without_query(data):
    Q, X = data
    np.testing.assert_allclose(qe.alpha_qe(Q, X), np_alpha_qe(Q, X, 50, 3.0), atol=2e-5)
    np.testing.assert_allclose(
        qe.alpha_qe(Q, X, k=5, include_query=False), np_alpha_qe(Q, X, 5, 3.0, False), atol=2e-5
    )


def test_aqe(data):
    Q, X = data
    np.testing.assert_allclose(qe.aqe(Q, X, k=7), np_alpha_qe(Q, X, 7, 0.0), atol=2e-5)


def test_alpha_qe_improves_recall_on_a_chain():
    """A query whose second relevant item is only close to the first one: αQE brings it up."""
    d = 16
    e = np.eye(d, dtype=np.float32)
    a = l2n(e[0] + 0.9 * e[1])
    b = l2n(e[1] + 0.9 * e[2] + 0.5 * e[0])
    noise = l2n(RNG.normal(size=(40, d)) * np.r_[0.0, 0.0, 0.0, np.ones(d - 3)]).astype(np.float32)
    X = np.vstack([a, b, noise]).astype(np.float32)
    q = e[:1]
    q2 = np.asarray(qe.alpha_qe(q, X, k=1, alpha=3.0))
    assert (q2 @ X[1]) > (q @ X[1])


def test_dba(data):
    _, X = data
    np.testing.assert_allclose(qe.dba(X, k=10, alpha=3.0), np_dba(X, 10, 3.0), atol=2e-5)


def test_dba_excludes_self_even_with_duplicates():
    X = unit_rows(20, 8)
    X[5] = X[4]
    out = np.asarray(qe.dba(X, k=3, alpha=1.0))
    ref = []
    for i in range(20):
        s = X @ X[i]
        order = [j for j in np.argsort(-s, kind="stable") if j != i][:3]
        ref.append(X[i] + (np.maximum(s[order], 0)[:, None] * X[order]).sum(0))
    np.testing.assert_allclose(out, l2n(np.array(ref)), atol=2e-5)


def test_expand_under_jit(data):
    Q, X = data
    s = Q @ X.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :9].astype(np.int32)
    sc = np.take_along_axis(s, ids, 1)
    out = jax.jit(qe.expand)(Q, X, sc, ids)
    np.testing.assert_allclose(out, np_alpha_qe(Q, X, 9, 3.0), atol=2e-5)


def test_output_is_unit_norm_and_same_shape(data):
    Q, X = data
    for out in (qe.alpha_qe(Q, X), qe.aqe(Q, X), qe.dba(X)):
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert qe.dba(X).shape == X.shape


def test_bad_input(data):
    Q, X = data
    with pytest.raises(ValueError, match="k"):
        qe.alpha_qe(Q, X, k=0)
    with pytest.raises(ValueError, match="k"):
        qe.alpha_qe(Q, X, k=301)
    with pytest.raises(ValueError, match="k: expected fewer"):
        qe.dba(X, k=300)
    with pytest.raises(ValueError):
        qe.aqe(Q[:, :5], X)
    bad = Q.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        qe.alpha_qe(bad, X)
    with pytest.raises(ValueError, match="scores and ids"):
        qe.expand(Q, X, np.zeros((12, 3), np.float32), np.zeros((12, 4), np.int32))
