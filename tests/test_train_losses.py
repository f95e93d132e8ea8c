import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret.normalize import l2n
from jret.train.losses import contrastive_loss, triplet_loss


def _tuples(rng, b=3, n=6, d=16):
    a = np.asarray(l2n(jnp.asarray(rng.normal(size=(b, d)), jnp.float32)))
    o = np.asarray(l2n(jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)))
    y = np.zeros((b, n), np.int32)
    y[:, 0] = 1
    return a, o, y


def _contrastive_ref(a, o, y, margin, eps=1e-6):
    total = 0.0
    for i in range(a.shape[0]):
        for j in range(o.shape[1]):
            d = np.sqrt(np.sum((a[i].astype(np.float64) - o[i, j] + eps) ** 2))
            total += 0.5 * d**2 if y[i, j] == 1 else 0.5 * max(0.0, margin - d) ** 2
    return total


def _triplet_ref(a, o, y, margin):
    total = 0.0
    for i in range(a.shape[0]):
        p = o[i][y[i] == 1][0]
        dp = np.sum((a[i] - p) ** 2)
        for j in np.flatnonzero(y[i] == 0):
            total += max(0.0, dp - np.sum((a[i] - o[i, j]) ** 2) + margin)
    return total


@pytest.mark.parametrize("margin", [0.7, 0.85, 1.9])
def test_contrastive_matches_reference(margin):
    a, o, y = _tuples(np.random.default_rng(0))
    got = contrastive_loss(a, o, y, margin=margin)
    np.testing.assert_allclose(got, _contrastive_ref(a, o, y, margin), rtol=1e-5)
    mean = contrastive_loss(a, o, y, margin=margin, reduction="mean")
    np.testing.assert_allclose(mean, _contrastive_ref(a, o, y, margin) / y.size, rtol=1e-5)
    single = contrastive_loss(a[1], o[1], y[1], margin=margin)
    np.testing.assert_allclose(single, _contrastive_ref(a[1:2], o[1:2], y[1:2], margin), rtol=1e-5)


def test_contrastive_far_negatives_cost_nothing():
    a = np.array([1.0, 0.0], np.float32)
    o = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    assert float(contrastive_loss(a, o, np.array([1, 0]), margin=0.7)) < 1e-10
    # a negative identical to the anchor costs ½ margin²
    got = contrastive_loss(a, o[:1], np.array([0]), margin=0.7)
    np.testing.assert_allclose(got, 0.5 * (0.7 - np.sqrt(2) * 1e-6) ** 2, rtol=1e-5)


@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_matches_reference(margin):
    a, o, y = _tuples(np.random.default_rng(1))
    y = np.roll(y, 2, axis=1)  # the positive need not come first
    np.testing.assert_allclose(
        triplet_loss(a, o, y, margin=margin), _triplet_ref(a, o, y, margin), rtol=1e-5
    )


def test_gradients_jit_and_closed_form():
    a, o, y = _tuples(np.random.default_rng(2), b=2, n=3, d=8)
    g = jax.jit(jax.grad(contrastive_loss, argnums=(0, 1)))(a, o, y)
    # positive pairs: d/da ½‖a − p + eps‖² = a − p + eps
    expected = np.zeros_like(a)
    for i in range(2):
        expected[i] += a[i] - o[i, 0] + 1e-6
        for j in (1, 2):
            diff = a[i] - o[i, j] + 1e-6
            d = np.linalg.norm(diff)
            if d < 0.7:
                expected[i] += -(0.7 - d) * diff / d
    np.testing.assert_allclose(g[0], expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g[1])))


def test_bad_input():
    a, o, y = _tuples(np.random.default_rng(3))
    with pytest.raises(ValueError, match="labels: expected shape"):
        contrastive_loss(a, o, y[:, :2])
    with pytest.raises(ValueError, match="dimension mismatch"):
        contrastive_loss(a, o[..., :4], y)
    with pytest.raises(ValueError, match="batch mismatch"):
        triplet_loss(a[:2], o, y)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(a, o, y, reduction="max")
    with pytest.raises(ValueError, match="floating"):
        contrastive_loss(a.astype(np.int32), o, y)
