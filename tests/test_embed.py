"""jret.embed against numpy transcriptions of seed 004 §4 and the kernel-descriptor equations."""

import itertools
import math

import jax
import numpy as np
import pytest
from scipy import special

from jret import embed
from jret.embed import feature_maps as fmaps

RNG = np.random.default_rng(0)


def unit(*shape):
    x = RNG.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def np_l2n(x, eps=1e-6):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


# ------------------------------------------------------------------------------------------------
# Local pre-processing, embeddings


@pytest.mark.parametrize("K", [24, 64])  # full eigendecomposition / leading eigenpairs only
def test_local_pca_matches_numpy(K):
    X = RNG.normal(size=(300, K)) @ RNG.normal(size=(K, K))
    pca = embed.local_pca_learn(X.astype(np.float32), 8)
    m = X.mean(0)
    lam, E = np.linalg.eigh(np.cov(X.T, bias=True))
    ref = np_l2n((X - m) @ E[:, ::-1][:, :8])
    got = np.asarray(embed.local_pca(X.astype(np.float32), pca))
    np.testing.assert_allclose(np.abs(got), np.abs(ref), atol=1e-4)  # eigenvector signs
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-4)


def np_residuals(x, C):
    return np.concatenate([np_l2n(x - c) for c in C], axis=-1)


def np_temb_fit(X, C, n_floor=33):
    R = np_residuals(X.astype(np.float64), C.astype(np.float64))
    mean = R.mean(0)
    lam, E = np.linalg.eigh((R - mean).T @ (R - mean) / len(R))
    lam, E = lam[::-1].copy(), E[:, ::-1]
    lam[-n_floor:] = lam[-n_floor]
    return mean, E, lam


def test_temb_matches_transcription():
    X, C = unit(600, 6), unit(8, 6)
    np.testing.assert_allclose(
        embed.triangulation_residuals(X[:7], C), np_residuals(X[:7], C), atol=1e-6
    )
    params = embed.temb_learn(X, C)
    mean, E, lam = np_temb_fit(X, C)
    np.testing.assert_allclose(params.mean, mean, atol=1e-5)
    Y = unit(20, 6)
    ref = np_l2n((np_residuals(Y, C) - mean) @ E / np.sqrt(lam))
    got = np.asarray(embed.temb(Y, params))
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=2e-4)  # sign-free comparison
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    sel = np.asarray(params.P) @ np.asarray(params.P).T  # rows: λ^{-1/2} e_iᵀ
    np.testing.assert_allclose(np.diag(sel), 1.0 / lam.astype(np.float32), rtol=2e-3)


def np_faemb_gamma(x, B, mu):
    """learn_coeff_one_sample: locality-regularised, affine-constrained least squares."""
    n = len(B)
    a = np.sum(np.abs(x - B).sum(1) ** 3)
    inv = np.linalg.inv(B @ B.T + a * mu * np.eye(n))
    one = np.ones(n)
    lam = (one @ inv @ B @ x - 1) / (one @ inv @ one)
    return inv @ (B @ x - lam * one)


def np_faemb_raw(x, B, mu):
    g = np_faemb_gamma(x, B, mu)
    out = []
    for j, b in enumerate(B):
        r = (x - b) / np.linalg.norm(x - b)
        out.append(g[j] * np.outer(r, r)[np.triu_indices(len(x))])
    return np.concatenate(out)


def test_faemb_matches_transcription():
    X, B = unit(300, 5).astype(np.float64), unit(4, 5).astype(np.float64)
    got = np.asarray(embed.faemb_coefficients(X[:9].astype(np.float32), B.astype(np.float32)))
    ref = np.stack([np_faemb_gamma(x, B, 1e-2) for x in X[:9]])
    np.testing.assert_allclose(got, ref, atol=2e-4)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    raw = np.asarray(embed.faemb_raw(X[:9].astype(np.float32), B.astype(np.float32)))
    assert raw.shape == (9, 4 * 15)
    np.testing.assert_allclose(raw, np.stack([np_faemb_raw(x, B, 1e-2) for x in X[:9]]), atol=2e-4)
    R = np.stack([np_faemb_raw(x, B, 1e-2) for x in X])
    mean = R.mean(0)
    lam, E = np.linalg.eigh(np.cov(R.T, bias=True))
    lam, E = lam[::-1].copy(), E[:, ::-1]
    lam[-20:] = lam[-20]  # with D = 60 < 129 every eigenvalue ends up floored: use a short floor
    params = embed.faemb_learn(X.astype(np.float32), B.astype(np.float32), n_floor=20)
    np.testing.assert_allclose(params.mean, mean, atol=1e-5)
    Y = X[:12]
    ref = np_l2n((R[:12] - mean) @ E / np.sqrt(lam))
    got = np.asarray(embed.faemb(Y.astype(np.float32), params))
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=5e-4)


def test_vlad_is_nearest_residual():
    X, C = unit(50, 4), unit(6, 4)
    got = np.asarray(embed.vlad(X, C)).reshape(50, 6, 4)
    for i, x in enumerate(X):
        j = np.argmin(((x - C) ** 2).sum(1))
        ref = np.zeros((6, 4))
        ref[j] = x - C[j]
        np.testing.assert_allclose(got[i], ref, atol=1e-6)
    np.testing.assert_allclose(
        embed.sum_pool(np.asarray(embed.vlad(X, C))), got.reshape(50, -1).sum(0), atol=1e-5
    )


# ------------------------------------------------------------------------------------------------
# Aggregation


def np_sinkhorn_weights(phi, iters=10, reg=0.5):
    """qdemocratic.m + sinkhornm.m: clipped Gram matrix, damped Sinkhorn, weights λ."""
    K = np.maximum(phi @ phi.T, 0)
    lam = np.ones(len(phi))
    for _ in range(iters):
        delta = 1.0 / K.sum(0) ** reg
        K = K * delta[None, :] * delta[:, None]
        lam = delta * lam
    return lam


def test_democratic_reference_solver_matches_transcription():
    phi = unit(3, 30, 16)
    mask = np.ones((3, 30), bool)
    mask[1, 20:] = False
    got = np.asarray(embed.democratic_weights(phi, mask, tol=None))
    for i in range(3):
        ref = np_sinkhorn_weights(phi[i][mask[i]].astype(np.float64))
        np.testing.assert_allclose(got[i][mask[i]], ref, rtol=1e-4)
        assert (got[i][~mask[i]] == 0).all()
    agg = np.asarray(embed.democratic(phi, mask, tol=None))
    np.testing.assert_allclose(agg, np.einsum("nm,nmd->nd", got, phi), atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 16), (200, 64)])
def test_democratic_weights_balance(shape):
    phi = unit(*shape)
    phi[: shape[0] // 4] = phi[0] + 0.05 * unit(shape[0] // 4, shape[1])  # a burst
    phi /= np.linalg.norm(phi, axis=1, keepdims=True)
    lam = np.asarray(embed.democratic_weights(phi), np.float64)
    K = np.maximum(phi.astype(np.float64) @ phi.T, 0)
    balance = lam * (K @ lam)
    assert (lam > 0).all()
    np.testing.assert_allclose(balance, balance.mean(), rtol=1e-4)
    burst = lam[: shape[0] // 4].mean()
    assert burst < lam[shape[0] // 4 :].mean()  # bursty locals are down-weighted


def test_democratic_weights_of_an_image_do_not_depend_on_its_batch():
    """Each image stops scaling when its own balance holds (these need 13 to 15 iterations).

    The image is compared in a batch of the same shape made of its own copies, so both runs sum
    in the same order and any difference comes from the number of scaling iterations (one more
    or one fewer moves the weights by 1e-6 to 6e-6 of their maximum)."""
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(5, 30, 16))
    phi[2, :12] = phi[2, 0] + 0.02 * rng.normal(size=(12, 16))  # a burst
    phi = (phi / np.linalg.norm(phi, axis=-1, keepdims=True)).astype(np.float32)
    whole = np.asarray(embed.democratic_weights(phi))
    for i in range(5):
        alone = np.asarray(embed.democratic_weights(np.stack([phi[i]] * 5)))[0]
        np.testing.assert_allclose(alone, whole[i], rtol=0, atol=1e-7 * alone.max())


def test_democratic_edge_cases():
    phi = unit(2, 6, 8)
    phi[0, 2] = 0.0  # a zero embedding
    mask = np.ones((2, 6), bool)
    mask[1] = False  # an image without locals
    lam = np.asarray(embed.democratic_weights(phi, mask))
    assert np.isfinite(lam).all() and lam[0, 2] == 0 and (lam[1] == 0).all()
    np.testing.assert_array_equal(np.asarray(embed.democratic(phi, mask))[1], 0.0)
    one = np.asarray(embed.democratic_weights(phi[0]))
    np.testing.assert_allclose(one, np.asarray(embed.democratic_weights(phi[:1]))[0], rtol=1e-6)
    jitted = jax.jit(lambda p, m: embed.democratic(p, m))
    np.testing.assert_allclose(jitted(phi, mask), embed.democratic(phi, mask), atol=1e-6)


def test_sum_pool_masks_rows():
    phi = unit(3, 5, 4)
    mask = RNG.random((3, 5)) > 0.4
    np.testing.assert_allclose(
        embed.sum_pool(phi, mask), np.einsum("nm,nmd->nd", mask, phi), atol=1e-6
    )


# ------------------------------------------------------------------------------------------------
# Post-processing, layers, pipeline


def test_postprocess_matches_reference_order():
    psi = RNG.normal(size=(60, 20)).astype(np.float32)
    rot = embed.postprocess_learn(psi)
    P = np.asarray(rot.P, np.float64)
    np.testing.assert_allclose(P @ P.T, np.eye(20), atol=1e-5)
    v = np_l2n(psi.astype(np.float64))
    var = ((v - v.mean(0)) @ P.T).var(0)
    assert (np.diff(var) <= 1e-7).all()  # rows by decreasing variance
    y = ((v - np.asarray(rot.m)) @ P.T)[:, 4:]
    ref = np_l2n(np.sign(y) * np.abs(y) ** 0.5)
    np.testing.assert_allclose(embed.postprocess(psi, rot, drop=4), ref, atol=1e-5)
    seed_rot = embed.postprocess_learn(psi, order="seed")
    Ps = np.asarray(seed_rot.P, np.float64)
    vs = np_l2n(np.sign(v) * np.abs(v) ** 0.5)
    ref_s = np_l2n(((vs - np.asarray(seed_rot.m)) @ Ps.T)[:, 4:])
    got_s = embed.postprocess(psi, seed_rot, drop=4, order="seed")
    np.testing.assert_allclose(got_s, ref_s, atol=1e-5)


def test_assemble_layers_max_pools_to_coarsest_grid():
    a = RNG.random((2, 3, 4, 5)).astype(np.float32)
    b = RNG.random((2, 7, 9, 2)).astype(np.float32)  # 2 × 2 floor pooling → (3, 4)
    got = np.asarray(embed.assemble_layers([a, b]))
    ref = np.zeros((2, 3, 4, 2), np.float32)
    for i, j in itertools.product(range(3), range(4)):
        ref[:, i, j] = b[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].max(axis=(1, 2))
    np.testing.assert_array_equal(got, np.concatenate([a, ref], -1))
    with pytest.raises(ValueError, match="integer"):
        embed.assemble_layers([a, RNG.random((2, 5, 4, 1)).astype(np.float32)])


@pytest.fixture(scope="module")
def learned():
    x = np.maximum(RNG.normal(size=(60, 12, 24)), 0).astype(np.float32)
    mask = RNG.random((60, 12)) > 0.3
    params = embed.selective_learn(jax.random.key(0), x, mask, d=8, k=6, drop=8)
    return x, mask, params


def test_selective_pipeline_composition(learned):
    x, mask, params = learned
    assert params.dim == 8 * 6 - 8
    got = embed.selective_describe(x, mask, params, batch_size=60)  # jitted
    np.testing.assert_allclose(
        embed.selective_describe(x, mask, params, batch_size=7), got, atol=2e-5
    )
    z = embed.local_pca(x, params.pca)
    psi = embed.democratic(embed.temb(z, params.embedding), mask)
    np.testing.assert_allclose(got, embed.postprocess(psi, params.rotation, drop=8), atol=2e-5)
    x2 = x.copy()
    x2[~mask] = 1e3  # unselected locals do not matter
    np.testing.assert_allclose(
        embed.selective_describe(x2, mask, params, batch_size=60), got, atol=2e-5
    )


@pytest.mark.parametrize(("method", "aggregation"), [("vlad", "sum"), ("faemb", "democratic")])
def test_selective_other_embeddings(method, aggregation):
    x = np.maximum(RNG.normal(size=(40, 10, 12)), 0).astype(np.float32)
    mask = np.ones((40, 10), bool)
    params = embed.selective_learn(
        jax.random.key(1), x, mask, method=method, d=4, k=5, aggregation=aggregation, drop=0
    )
    out = embed.selective_describe(x, mask, params)
    dim = 4 * 5 if method == "vlad" else 5 * 10
    assert out.shape == (40, dim) and np.isfinite(out).all()
    if method == "vlad":
        z = np.asarray(embed.local_pca(x, params.pca))
        C = np.asarray(params.embedding)
        ref = np.asarray(embed.vlad(z, C)).sum(1)
        np.testing.assert_allclose(embed.postprocess(ref, params.rotation, drop=0), out, atol=2e-5)


def test_temb_settings_follow_table_4():
    for dim, (d, k) in embed.TEMB_SETTINGS.items():
        assert d * k - 128 == dim
    assert embed.temb_setting(512) == (32, 20)
    (d, k) = embed.SAME_DIM_SETTINGS["faemb"]
    assert (k - 2) * d * (d + 1) // 2 == 4224


# ------------------------------------------------------------------------------------------------
# Kernel feature maps


def test_von_mises_coefficients_regression_values():
    np.testing.assert_allclose(
        fmaps.von_mises_coefficients(8.0, 3), [0.143432, 0.268285, 0.219792, 0.158389], atol=1e-6
    )
    np.testing.assert_allclose(
        fmaps.von_mises_coefficients(1.0, 1), [0.382142, 0.480904], atol=1e-6
    )
    np.testing.assert_allclose(
        fmaps.von_mises_coefficients(2.0, 1), [0.295607, 0.438571], atol=1e-6
    )
    k = 3.0  # eq. 11 with unscaled Bessel functions
    want = [(special.iv(0, k) - math.exp(-k)) / (2 * math.sinh(k))] + [
        special.iv(n, k) / math.sinh(k) for n in (1, 2)
    ]
    np.testing.assert_allclose(fmaps.von_mises_coefficients(k, 2), want, rtol=1e-10)


def test_truncated_series_converges_to_von_mises():
    d = np.linspace(-np.pi, np.pi, 41)
    exact = (np.exp(8 * np.cos(d)) - np.exp(-8)) / (2 * np.sinh(8))
    np.testing.assert_allclose(fmaps.von_mises_kernel(d), exact, atol=1e-6)
    np.testing.assert_allclose(fmaps.truncated_kernel(d, 8.0, 30), exact, atol=1e-5)
    assert abs(float(fmaps.truncated_kernel(0.0)) - 0.790) < 1e-3


@pytest.mark.parametrize("layout", ["interleaved", "grouped"])
def test_angle_feature_map_reproduces_kernel(layout):
    t1, t2 = RNG.uniform(-np.pi, np.pi, 25), RNG.uniform(-np.pi, np.pi, 25)
    a1, a2 = fmaps.angle_feature_map(t1, layout=layout), fmaps.angle_feature_map(t2, layout=layout)
    assert a1.shape == (25, 7)
    np.testing.assert_allclose(
        np.sum(np.asarray(a1) * np.asarray(a2), 1), fmaps.truncated_kernel(t1 - t2), atol=1e-6
    )
    g = np.sqrt(fmaps.von_mises_coefficients())
    t = 0.3
    inter = [g[0], g[1] * np.cos(t), g[1] * np.sin(t), g[2] * np.cos(2 * t), g[2] * np.sin(2 * t)]
    inter += [g[3] * np.cos(3 * t), g[3] * np.sin(3 * t)]
    grouped = [inter[0], inter[1], inter[3], inter[5], inter[2], inter[4], inter[6]]
    want = inter if layout == "interleaved" else grouped
    np.testing.assert_allclose(fmaps.angle_feature_map(t, layout=layout), want, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_monomial_embedding_kernel(p):
    x, y = RNG.normal(size=(4, 6)), RNG.normal(size=(4, 6))
    ex = np.asarray(fmaps.monomial_embedding(x.astype(np.float32), p), np.float64)
    ey = np.asarray(fmaps.monomial_embedding(y.astype(np.float32), p), np.float64)
    assert ex.shape[1] == math.comb(6 + p - 1, p)
    np.testing.assert_allclose((ex * ey).sum(1), (x * y).sum(1) ** p, rtol=1e-4)


def test_monomial_embedding_order():
    x = np.array([2.0, 3.0, 5.0], np.float32)
    s2, s3, s6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    np.testing.assert_allclose(
        fmaps.monomial_embedding(x, 2), [4, 9, 25, s2 * 6, s2 * 10, s2 * 15], rtol=1e-6
    )
    pairs = [s3 * x[i] ** 2 * x[j] for i in range(3) for j in range(3) if i != j]
    np.testing.assert_allclose(
        fmaps.monomial_embedding(x, 3), [8, 27, 125, *pairs, s6 * 30], rtol=1e-6
    )
    assert fmaps.monomial_embedding(np.zeros((1, 80), np.float32), 2).shape[1] == 3240


@pytest.mark.parametrize("layout", ["interleaved", "grouped"])
def test_modulation_and_rotation(layout):
    desc, theta = unit(2, 15, 5), RNG.uniform(-np.pi, np.pi, (2, 15)).astype(np.float32)
    mask = np.ones((2, 15), bool)
    mask[1, 10:] = False
    X = np.asarray(fmaps.modulate(desc, theta, mask, layout=layout))
    a = np.asarray(fmaps.angle_feature_map(theta, layout=layout))
    ref = np.stack(
        [sum(np.kron(desc[n, i], a[n, i]) for i in range(15) if mask[n, i]) for n in (0, 1)]
    )
    np.testing.assert_allclose(X, ref, atol=1e-5)
    # m(x, θx)ᵀ m(y, θy) = (xᵀy) k̄(θx − θy)
    pair = np.asarray(fmaps.modulate(desc[:, :1], theta[:, :1], layout=layout))
    k = fmaps.truncated_kernel(theta[0, 0] - theta[1, 0])
    np.testing.assert_allclose(pair[0] @ pair[1], (desc[0, 0] @ desc[1, 0]) * k, atol=1e-5)
    # rotating every orientation by δ
    delta = 0.7
    rotated = fmaps.modulate(desc, theta + delta, mask, layout=layout)
    np.testing.assert_allclose(fmaps.rotate_modulated(X, delta, layout=layout), rotated, atol=1e-5)
    thetas = np.linspace(-np.pi, np.pi, 9)
    scores = np.asarray(fmaps.rotation_scores(X, X[::-1], thetas, layout=layout))
    for r, t in enumerate(thetas):
        direct = np.asarray(fmaps.rotate_modulated(X, t, layout=layout)) @ X[::-1].T
        np.testing.assert_allclose(scores[..., r], direct, atol=1e-4)
    grid = np.linspace(-np.pi, np.pi, 64, endpoint=False)
    best = grid[
        np.argmax(
            np.asarray(fmaps.rotation_scores(X[:1], np.asarray(rotated[:1]), grid, layout=layout))[
                0, 0
            ]
        )
    ]
    assert abs(best - delta) < 2 * np.pi / 64


def test_modulated_power_law():
    X = RNG.normal(size=(3, 4 * 7)).astype(np.float32)
    got = np.asarray(fmaps.modulated_power_law(X, 0.2))
    R = X.reshape(3, 4, 7).astype(np.float64)
    ref = R.copy()
    ref[..., 0] = np.sign(R[..., 0]) * np.abs(R[..., 0]) ** 0.2
    for f in range(1, 4):
        c, s = R[..., 2 * f - 1], R[..., 2 * f]
        mod = np.sqrt(c**2 + s**2) ** (1 - 0.2)
        ref[..., 2 * f - 1], ref[..., 2 * f] = c / mod, s / mod
    np.testing.assert_allclose(got, ref.reshape(3, -1), rtol=1e-5)
    rot = fmaps.rotate_modulated(X, 1.1)  # the modulus is rotation invariant
    np.testing.assert_allclose(
        fmaps.modulated_power_law(rot),
        fmaps.rotate_modulated(fmaps.modulated_power_law(X), 1.1),
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: embed.local_pca_learn(np.zeros((5, 4), np.float32), 6), "at most K"),
        (lambda: embed.local_pca_learn(np.full((5, 4), np.nan, np.float32), 2), "NaN"),
        (lambda: embed.temb(unit(3, 5), embed.temb_learn(unit(50, 4), unit(3, 4))), "mismatch"),
        (lambda: embed.temb_learn(unit(50, 4), unit(3, 5)), "centroids"),
        (lambda: embed.temb_learn(np.zeros((0, 4), np.float32), unit(3, 4)), "at least one"),
        (lambda: embed.faemb_coefficients(unit(3, 5), unit(4, 6)), "mismatch"),
        (lambda: embed.vlad(unit(3, 5).astype(np.int32), unit(4, 5)), "floating"),
        (lambda: embed.democratic(unit(5, 4, 3, 2)), "padded batch"),
        (lambda: embed.democratic(unit(2, 4, 3), np.ones((2, 5), bool)), "mask"),
        (lambda: embed.democratic_weights(unit(4, 3), iters=0), "positive integer"),
        (lambda: embed.postprocess(unit(4, 6), embed.postprocess_learn(unit(9, 5))), "rotation"),
        (
            lambda: embed.postprocess(unit(4, 5), embed.postprocess_learn(unit(9, 5)), drop=5),
            "drop",
        ),
        (
            lambda: embed.postprocess(unit(4, 5), embed.postprocess_learn(unit(9, 5)), order="x"),
            "order",
        ),
        (lambda: embed.temb_setting(300), "dim"),
        (lambda: embed.assemble_layers([]), "at least one"),
        (
            lambda: embed.selective_learn(
                jax.random.key(0), unit(4, 3, 5), np.ones((4, 3), bool), method="fv"
            ),
            "method",
        ),
        (
            lambda: embed.selective_learn(
                jax.random.key(0), unit(4, 3, 5), np.zeros((4, 3), bool), d=2, k=2, drop=0
            ),
            "selected locals",
        ),
        (
            lambda: embed.selective_learn(
                jax.random.key(0), unit(4, 3, 5), np.ones((4, 3), bool), d=2, k=2
            ),
            "drop",
        ),
        (lambda: fmaps.angle_feature_map(0.0, kappa=0.0), "kappa"),
        (lambda: fmaps.angle_feature_map(0.0, layout="zig"), "layout"),
        (lambda: fmaps.monomial_embedding(unit(2, 3), 4), "p"),
        (lambda: fmaps.modulate(unit(2, 3, 4), np.zeros((2, 4))), "theta"),
        (lambda: fmaps.rotate_modulated(unit(2, 10), 0.5), "multiple"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# The experiment stage


@pytest.fixture(scope="module")
def tiny_stage(tmp_path_factory):
    """experiments/selective_stage.py, and the tiny benchmark's config with its section, test set
    and network."""
    import importlib.util
    import pathlib
    import sys

    from jret import pipeline

    repo = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    try:
        from test_pipeline import tiny_config
    finally:
        sys.path.pop(0)
    spec = importlib.util.spec_from_file_location(
        "selective_stage", repo / "experiments" / "selective_stage.py"
    )
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    config = tiny_config(tmp_path_factory.mktemp("data"))
    config.selective = stage.default_config()
    config.selective.update(dict(scale=1.0, d=8, k=4, drop=8, masks=("sum", "sift")))
    config.selective.hashing.bits = (8, 16)
    dataset, root = pipeline.load_test_set(config)
    model, variables = pipeline.build_model(config)
    return stage, config, dataset, root, model, variables


def test_selective_stage_rows_on_the_tiny_benchmark(tiny_stage):
    """The stage as the main job calls it, end to end: one row per pooling, mask and code."""
    from jret import experiment

    stage, config, dataset, root, model, variables = tiny_stage
    rows = stage.stage_rows(config, dataset, root, model, variables, None)
    masked = [f"{m}-mask + Temb + democratic (24-D)" for m in ("SUM", "SIFT")]
    hashed = [
        f"{name}, {b} bits (SUM-mask)" for name in ("ITQ", "PCA + random rotation") for b in (8, 16)
    ]
    assert list(rows) == ["SPoC", "MAC", *masked, *hashed]
    assert len(experiment.map_rows(rows)) == len(rows)
    for r in rows.values():
        assert all(0.0 <= r[s]["map"] <= 1.0 for s in ("easy", "medium", "hard"))


@pytest.mark.slow
def test_selective_stage_maps_are_those_of_the_global_extraction(tiny_stage):
    """The stage's database maps give the SPoC descriptors that the global extraction computes
    with a SPoC head at the same scale."""
    from jret.extract import extract_global
    from jret.models import RetrievalNet

    stage, config, dataset, root, model, variables = tiny_stage
    maps = stage.conv_maps(config, dataset, root, model, variables)["db"]
    scfg = config.selective.copy_and_resolve_references()
    scfg.masks = ()
    X = stage.describe({"query": maps, "db": maps, "train": maps}, scfg, None)
    spoc = RetrievalNet(model.backbone, model.backbone_kwargs, pooling="spoc")
    files = [dataset.image_path(i) for i in range(len(dataset.imlist))]
    ref = extract_global(
        spoc.bind(variables), files, scales=(1.0,), max_side=config.extract.max_side
    )
    np.testing.assert_allclose(X["SPoC"][1], ref, atol=1e-5)
