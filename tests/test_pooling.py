"""jret.pooling against direct numpy transcriptions of the pooling equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret import pooling

RNG = np.random.default_rng(0)


def relu_map(*shape):
    return np.maximum(RNG.normal(size=shape), 0).astype(np.float32)


def np_mac(x, mask):
    return np.stack(
        [x[i][mask[i]].max(0) if mask[i].any() else np.zeros(x.shape[-1]) for i in range(len(x))]
    )


def np_spoc(x, mask):
    return np.stack(
        [x[i][mask[i]].mean(0) if mask[i].any() else np.zeros(x.shape[-1]) for i in range(len(x))]
    )


def np_gem(x, p, mask, eps=1e-6):
    out = []
    for i in range(len(x)):
        v = np.maximum(x[i][mask[i]].astype(np.float64), eps)
        out.append((v**p).mean(0) ** (1.0 / p))
    return np.stack(out)


def np_rmac_regions(H, W, L):
    """Transcription of the R-MAC grid rule (SPEC §2.2) with explicit loops."""
    w = min(H, W)
    wl = max(H, W)
    errs = []
    for m in range(2, 8):
        b = (wl - w) / (m - 1)
        errs.append(abs((w - b) / w - 0.4))
    idx = int(np.argmin(errs)) + 2
    extra = idx - 1 if H != W else 0
    out = []
    for level in range(1, L + 1):
        s = int(2 * w // (level + 1))
        if s == 0:
            continue
        nw = level + (extra if H < W else 0)
        nh = level + (extra if H > W else 0)
        for i in range(nh):
            y0 = 0 if nh == 1 else int(np.floor(i * (H - s) / (nh - 1)))
            for j in range(nw):
                x0 = 0 if nw == 1 else int(np.floor(j * (W - s) / (nw - 1)))
                out.append((y0, x0, y0 + s, x0 + s))
    return np.array(out)


@pytest.fixture
def batch():
    x = relu_map(3, 7, 9, 16)
    mask = np.ones((3, 7, 9), bool)
    mask[1, 5:, :] = False
    mask[2, :, 6:] = False
    return x, mask


def test_mac_spoc_gem_match_numpy(batch):
    x, mask = batch
    np.testing.assert_allclose(pooling.mac(x, mask=mask), np_mac(x, mask), rtol=1e-6)
    np.testing.assert_allclose(pooling.spoc(x, mask=mask), np_spoc(x, mask), rtol=1e-5)
    np.testing.assert_allclose(pooling.gem(x, 3.0, mask=mask), np_gem(x, 3.0, mask), rtol=1e-4)
    full = np.ones(mask.shape, bool)
    np.testing.assert_allclose(pooling.gem(x), np_gem(x, 3.0, full), rtol=1e-4)


def test_single_map_equals_batch_row(batch):
    x, _ = batch
    np.testing.assert_allclose(pooling.gem(x[1]), pooling.gem(x)[1], rtol=1e-6)
    assert pooling.mac(x[0]).shape == (16,)


def test_gem_limits_and_per_channel_p(batch):
    x, mask = batch
    np.testing.assert_allclose(pooling.gem(x, 1.0, eps=0.0), pooling.spoc(x), rtol=1e-5, atol=1e-7)
    # MAC·n^(-1/p) <= GeM_p <= MAC, so GeM -> MAC as p -> inf (and stays finite in float32).
    n = x.shape[1] * x.shape[2]
    big = np.asarray(pooling.gem(x + 0.1, 200.0))
    top = np.asarray(pooling.mac(x + 0.1))
    assert np.all(big <= top * (1 + 1e-5)) and np.all(big >= top * n ** (-1 / 200) * (1 - 1e-5))
    p = RNG.uniform(1.5, 4.0, size=16).astype(np.float32)
    ref = np.concatenate([np_gem(x[..., c : c + 1], p[c], mask) for c in range(16)], -1)
    np.testing.assert_allclose(pooling.gem(x, p, mask=mask), ref, rtol=1e-4)


def test_gem_gradients_match_closed_form():
    """Autodiff of GeM equals TPAMI 2018 eq. 4–5 on positive inputs."""
    x = RNG.uniform(0.1, 2.0, size=(5, 4, 3)).astype(np.float64)
    p = 2.7
    n = x.shape[0] * x.shape[1]
    s = (x**p).reshape(n, -1).sum(0)
    f = (s / n) ** (1 / p)
    dfdx = (1 / n) * f ** (1 - p) * x ** (p - 1)
    logsum = (x**p * np.log(x)).reshape(n, -1).sum(0)
    dfdp = f / p**2 * (np.log(n / s) + p * logsum / s)
    gx = jax.grad(lambda v: pooling.gem(v, p).sum())(jnp.asarray(x, jnp.float32))
    gp = jax.jacobian(lambda q: pooling.gem(jnp.asarray(x, jnp.float32), q))(jnp.float32(p))
    np.testing.assert_allclose(gx, dfdx, rtol=1e-4)
    np.testing.assert_allclose(gp, dfdp, rtol=1e-3)


def test_zero_and_all_masked_maps_are_finite():
    x = np.zeros((2, 4, 4, 5), np.float32)
    mask = np.zeros((2, 4, 4), bool)
    mask[0] = True
    for fn in (pooling.mac, pooling.spoc, pooling.gem):
        out = np.asarray(fn(x, mask=mask))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[1], 0.0)
    g = jax.grad(lambda v: pooling.gem(v, 3.0, mask=mask).sum())(jnp.asarray(x))
    assert np.isfinite(np.asarray(g)).all()


def test_weighted_spoc(batch):
    x, mask = batch
    w = RNG.uniform(size=mask.shape).astype(np.float32)
    ref = np.einsum("nhw,nhwc->nc", w * mask, x)
    np.testing.assert_allclose(pooling.weighted_spoc(x, w, mask=mask), ref, rtol=1e-5)
    np.testing.assert_allclose(
        pooling.weighted_spoc(x[0], w[0]), np.einsum("hw,hwc->c", w[0], x[0]), rtol=1e-5
    )


@pytest.mark.parametrize("hw", [(24, 32), (32, 24), (48, 64), (7, 7), (10, 30), (3, 1), (1, 1)])
def test_rmac_regions_match_rule(hw):
    np.testing.assert_array_equal(pooling.rmac_regions(*hw, 3), np_rmac_regions(*hw, 3))


def test_rmac_region_counts():
    assert len(pooling.rmac_regions(24, 32)) == 20
    assert len(pooling.rmac_regions(48, 64)) == 20
    assert len(pooling.rmac_regions(16, 16)) == 14


def test_regional_matches_slicing(batch):
    x, mask = batch
    boxes = np.array([[0, 0, 7, 9], [1, 2, 4, 8], [5, 6, 7, 9]], np.int32)
    for name, ref_fn in (("mac", np_mac), ("spoc", np_spoc)):
        out = pooling.regional(x, boxes, name, mask=mask)
        assert out.shape == (3, 3, 16)
        for r, (y0, x0, y1, x1) in enumerate(boxes):
            ref = ref_fn(x[:, y0:y1, x0:x1], mask[:, y0:y1, x0:x1])
            np.testing.assert_allclose(out[:, r], ref, rtol=1e-5)
    gem_out = pooling.regional(x, boxes, "gem", p=2.0)
    sub = x[:, 1:4, 2:8]
    np.testing.assert_allclose(
        gem_out[:, 1], np_gem(sub, 2.0, np.ones(sub.shape[:3], bool)), rtol=1e-4
    )


def test_rmac_matches_numpy(batch):
    x, _ = batch
    H, W = x.shape[1:3]
    boxes = [(0, 0, H, W)] + [tuple(b) for b in np_rmac_regions(H, W, 3)]
    ref = []
    for img in x:
        v = np.zeros(x.shape[-1])
        for y0, x0, y1, x1 in boxes:
            r = img[y0:y1, x0:x1].reshape(-1, x.shape[-1]).max(0)
            v += r / (np.linalg.norm(r) + 1e-6)
        ref.append(v / (np.linalg.norm(v) + 1e-6))
    np.testing.assert_allclose(pooling.rmac(x), np.stack(ref), rtol=1e-5, atol=1e-7)


def test_rmac_with_regional_whitening(batch):
    from jret.whitening import Whitening

    x, _ = batch
    C = x.shape[-1]
    P = RNG.normal(size=(8, C)).astype(np.float32)
    m = RNG.normal(size=C).astype(np.float32) * 0.01
    wt = Whitening(m=jnp.asarray(m), P=jnp.asarray(P))
    H, W = x.shape[1:3]
    ref = []
    for img in x:
        v = np.zeros(8)
        for y0, x0, y1, x1 in np_rmac_regions(H, W, 3):
            r = img[y0:y1, x0:x1].reshape(-1, C).max(0)
            r = r / (np.linalg.norm(r) + 1e-6)
            y = (r - m) @ P.T
            v += y / (np.linalg.norm(y) + 1e-6)
        ref.append(v / (np.linalg.norm(v) + 1e-6))
    np.testing.assert_allclose(pooling.rmac(x, whitening=wt), np.stack(ref), rtol=1e-4, atol=1e-6)


def test_jit_and_vmap_agree(batch):
    x, mask = batch
    for fn in (pooling.mac, pooling.spoc, pooling.gem, pooling.rmac):
        np.testing.assert_allclose(jax.jit(fn)(x), fn(x), rtol=1e-6)
        np.testing.assert_allclose(jax.vmap(fn)(x), fn(x), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(pooling.gem)(x, 2.5, mask=mask), pooling.gem(x, 2.5, mask=mask), rtol=1e-6
    )


def test_bad_input():
    x = relu_map(2, 4, 4, 3)
    with pytest.raises(ValueError, match="x: expected"):
        pooling.gem(x[0, 0])
    with pytest.raises(ValueError, match="floating"):
        pooling.mac(x.astype(np.int32))
    with pytest.raises(ValueError, match="mask"):
        pooling.spoc(x, mask=np.ones((2, 4, 5), bool))
    with pytest.raises(ValueError, match="p: expected"):
        pooling.gem(x, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="boxes"):
        pooling.regional(x, np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError, match="pool"):
        pooling.regional(x, np.zeros((1, 4), np.int32), "median")
    with pytest.raises(ValueError, match="w: expected"):
        pooling.weighted_spoc(x, np.ones((2, 3, 3), np.float32))
