"""Explicit kernel feature maps and orientation-covariant aggregation (SPEC §10.8–10.9).

Tolias, Furon & Jégou, "Orientation covariant aggregation of local descriptors with embeddings",
ECCV 2014 (thesis [000] L3663–4285), and its CVIU extension ([000] L5425–5645).

* Von Mises kernel on angles (eq. 9): ``k_VM(Δθ) = (exp(κ cos Δθ) − exp(−κ)) / (2 sinh κ)``; its
  Fourier series truncated to N frequencies (eq. 11) ``k̄_N(Δθ) = Σ_{n=0..N} γ_n cos nΔθ`` with
  ``γ₀ = (I₀(κ) − e^{−κ})/(2 sinh κ)``, ``γ_n = I_n(κ)/sinh κ``; the feature map (eq. 12) has
  ``2N + 1`` components and ``φ(θ₁)ᵀφ(θ₂) = k̄_N(θ₁ − θ₂)``. Defaults κ = 8, N = 3 (7-D).
* Monomial embeddings φ_p with ``φ_p(x)ᵀφ_p(y) = (xᵀy)^p`` (p = 1, 2, 3).
* Modulation (eq. 19–22): ``m(x, θ) = x ⊗ φ(θ)`` (descriptor-major), summed over an image's
  locals; a global rotation of the image's orientations only mixes the cos/sin coordinates of
  each frequency (eq. 23–24), so the similarity to a rotated query is a trigonometric polynomial
  in the rotation angle (eq. 25–26).

Component order of φ(θ): ``layout='interleaved'`` (default; ``√γ₀, √γ₁ cos θ, √γ₁ sin θ, …``) or
``'grouped'`` (``√γ₀, √γ₁ cos θ, …, √γ_N cos Nθ, √γ₁ sin θ, …``). Rotation convention: rotating the
query by ``+θ`` adds ``θ`` to every orientation (SPEC §14.1 #49).
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from jret._checks import check_floating, check_ndim, check_positive_int

KAPPA = 8.0
N_FREQ = 3
LAYOUTS = ("interleaved", "grouped")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _check_kappa(kappa: float) -> float:
    if not np.isfinite(kappa) or kappa <= 0:
        raise ValueError(f"kappa: expected a positive finite number, got {kappa!r}")
    return float(kappa)


@partial(jax.jit, static_argnames=("kappa",))
def von_mises_kernel(dtheta: jax.Array, kappa: float = KAPPA) -> jax.Array:
    """``k_VM(Δθ) = (exp(κ cos Δθ) − exp(−κ)) / (2 sinh κ)`` ∈ [0, 1] (eq. 9), computed as
    ``(exp(κ(cos Δθ − 1)) − exp(−2κ)) / (1 − exp(−2κ))`` to avoid overflow."""
    kappa = _check_kappa(kappa)
    dtheta = jnp.asarray(dtheta, jnp.float32)
    e2 = math.exp(-2.0 * kappa)
    return (jnp.exp(kappa * (jnp.cos(dtheta) - 1.0)) - e2) / (1.0 - e2)


def von_mises_coefficients(kappa: float = KAPPA, n: int = N_FREQ) -> np.ndarray:
    """Fourier coefficients ``γ₀..γ_N`` ``(N + 1,)`` float64 of ``k_VM`` (eq. 11).

    Computed with exponentially scaled Bessel functions: ``γ₀ = (ive(0, κ) − e^{−2κ})/(1 − e^{−2κ})``,
    ``γ_n = 2 ive(n, κ)/(1 − e^{−2κ})``. κ = 8: (0.143432, 0.268285, 0.219792, 0.158389).
    """
    kappa = _check_kappa(kappa)
    n = check_positive_int(n, "n")
    e2 = math.exp(-2.0 * kappa)
    ive = special.ive(np.arange(n + 1), kappa)
    return np.concatenate([[(ive[0] - e2) / (1.0 - e2)], 2.0 * ive[1:] / (1.0 - e2)])


@partial(jax.jit, static_argnames=("kappa", "n"))
def truncated_kernel(dtheta: jax.Array, kappa: float = KAPPA, n: int = N_FREQ) -> jax.Array:
    """``k̄_N(Δθ) = Σ_{n=0..N} γ_n cos nΔθ``, the kernel the feature map reproduces exactly."""
    gamma = jnp.asarray(von_mises_coefficients(kappa, n), jnp.float32)
    dtheta = jnp.asarray(dtheta, jnp.float32)
    return jnp.cos(dtheta[..., None] * jnp.arange(n + 1)) @ gamma


def _cos_sin_index(n: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the cos and sin components of frequencies 1..N in φ(θ)."""
    _check_layout(layout)
    f = np.arange(1, n + 1)
    return (2 * f - 1, 2 * f) if layout == "interleaved" else (f, n + f)


@partial(jax.jit, static_argnames=("kappa", "n", "layout"))
def angle_feature_map(
    theta: jax.Array, kappa: float = KAPPA, n: int = N_FREQ, layout: str = "interleaved"
) -> jax.Array:
    """φ(θ) ``(..., 2N + 1)`` of angles ``(...)`` with ``φ(θ₁)ᵀφ(θ₂) = k̄_N(θ₁ − θ₂)`` (eq. 12)."""
    root = jnp.asarray(np.sqrt(von_mises_coefficients(kappa, n)), jnp.float32)
    ci, si = _cos_sin_index(n, layout)
    theta = jnp.asarray(theta, jnp.float32)
    angles = theta[..., None] * jnp.arange(1, n + 1)
    out = jnp.zeros((*theta.shape, 2 * n + 1), jnp.float32).at[..., 0].set(root[0])
    return (
        out.at[..., ci].set(root[1:] * jnp.cos(angles)).at[..., si].set(root[1:] * jnp.sin(angles))
    )


def _monomial_terms(d: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Index tuples ``(T, p)`` and weights ``(T,)`` of φ_p, in the order of the docstring below.

    A term's weight is the square root of its multinomial coefficient, so that the map's inner
    product is ``(xᵀy)^p``.
    """
    r = range(d)
    if p == 2:
        terms = [(i, i) for i in r] + list(itertools.combinations(r, 2))
        weights = [1.0] * d + [2.0] * (len(terms) - d)
    else:
        pairs = [(i, i, j) for i in r for j in r if i != j]
        triples = list(itertools.combinations(r, 3))
        terms = [(i, i, i) for i in r] + pairs + triples
        weights = [1.0] * d + [3.0] * len(pairs) + [6.0] * len(triples)
    return np.array(terms, np.int64).reshape(-1, p), np.sqrt(np.array(weights))


@partial(jax.jit, static_argnames=("p",))
def monomial_embedding(x: jax.Array, p: int) -> jax.Array:
    """Monomial feature map φ_p ``(..., d)`` → ``(..., C(d + p − 1, p))`` with
    ``φ_p(x)ᵀφ_p(y) = (xᵀy)^p`` ([000] L3663–3740), for p = 1, 2, 3.

    φ₁(x) = x; φ₂(x) = [x_i², √2 x_i x_j (i < j)] ∈ R^{d(d+1)/2};
    φ₃(x) = [x_i³, √3 x_i² x_j (i ≠ j), √6 x_i x_j x_k (i < j < k)] ∈ R^{d(d+1)(d+2)/6}.
    """
    if p not in (1, 2, 3):
        raise ValueError(f"p: expected 1, 2 or 3, got {p!r}")
    check_floating(x, "x")
    if p == 1:
        return x
    idx, w = _monomial_terms(x.shape[-1], p)
    return jnp.prod(x[..., idx], axis=-1) * jnp.asarray(w, x.dtype)


@partial(jax.jit, static_argnames=("kappa", "n", "layout"))
def modulate(
    desc: jax.Array,
    theta: jax.Array,
    mask: jax.Array | None = None,
    kappa: float = KAPPA,
    n: int = N_FREQ,
    layout: str = "interleaved",
) -> jax.Array:
    """Orientation-covariant aggregation ``X = Σ_i ψ(x_i) ⊗ φ(θ_i)`` (eq. 19–22).

    Args:
      desc: embedded locals ``ψ(x)`` ``(N, M, D)`` (any coder: identity, monomials, VLAD, …).
      theta: their orientations in radians ``(N, M)``.
      mask: valid locals ``(N, M)`` (default: all).
      kappa, n, layout: the angle feature map (κ = 8, N = 3, interleaved).

    Returns the un-normalised ``(N, D·(2N + 1))`` vectors, descriptor-major (component ``d`` owns
    coordinates ``d·(2N+1) … d·(2N+1) + 2N``); ℓ2-normalise them (the factor β) before comparing.
    """
    check_ndim(desc, "desc", (3,), "embedded locals (N, M, D)")
    check_floating(desc, "desc")
    if tuple(np.shape(theta)) != tuple(desc.shape[:2]):
        raise ValueError(f"theta: expected shape {desc.shape[:2]}, got {np.shape(theta)}")
    phi = angle_feature_map(theta, kappa, n, layout)
    if mask is not None:
        if tuple(np.shape(mask)) != tuple(desc.shape[:2]):
            raise ValueError(f"mask: expected shape {desc.shape[:2]}, got {np.shape(mask)}")
        phi = jnp.where(jnp.asarray(mask, bool)[..., None], phi, 0.0)
    out = jnp.einsum("nmd,nmf->ndf", desc, phi.astype(desc.dtype))
    return out.reshape(desc.shape[0], -1)


def _split(X: jax.Array, n: int, layout: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``X (..., D·(2N+1))`` → ``X₀ (..., D)``, ``X_c``, ``X_s`` ``(..., D, N)``."""
    if X.shape[-1] % (2 * n + 1):
        raise ValueError(
            f"X: last dimension {X.shape[-1]} is not a multiple of 2N + 1 = {2 * n + 1}"
        )
    ci, si = _cos_sin_index(n, layout)
    R = X.reshape(*X.shape[:-1], -1, 2 * n + 1)
    return R[..., 0], R[..., ci], R[..., si]


@partial(jax.jit, static_argnames=("n", "layout"))
def rotate_modulated(
    X: jax.Array, theta: jax.Array | float, n: int = N_FREQ, layout: str = "interleaved"
) -> jax.Array:
    """The modulated vector of the same locals with every orientation increased by ``theta``.

    Per frequency ``k``: ``X̆_c = X_c cos kθ − X_s sin kθ``, ``X̆_s = X_s cos kθ + X_c sin kθ``;
    ``X₀`` is unchanged (eq. 23–24 with jret's ``+θ`` convention). Norm-preserving.
    """
    check_floating(X, "X")
    n = check_positive_int(n, "n")
    X = jnp.asarray(X)
    x0, xc, xs = _split(X, n, layout)
    ang = jnp.asarray(theta, X.dtype) * jnp.arange(1, n + 1, dtype=X.dtype)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    ci, si = _cos_sin_index(n, layout)
    R = X.reshape(*X.shape[:-1], -1, 2 * n + 1)
    R = R.at[..., ci].set(xc * cos - xs * sin).at[..., si].set(xs * cos + xc * sin)
    return R.at[..., 0].set(x0).reshape(X.shape)


@partial(jax.jit, static_argnames=("n", "layout"))
def rotation_polynomial(
    X: jax.Array, Y: jax.Array, n: int = N_FREQ, layout: str = "interleaved"
) -> jax.Array:
    """Coefficients ``(nq, nb, 2N + 1)`` of ``θ ↦ ⟨X̆(θ)|Y⟩`` for queries ``X (nq, F)`` and
    database ``Y (nb, F)``, ``F = D(2N+1)`` (eq. 25–26 with the ``+θ`` convention):

    ``⟨X̆|Y⟩ = a₀ + Σ_k a_k cos kθ + Σ_k b_k sin kθ`` with ``a₀ = ⟨X₀|Y₀⟩``,
    ``a_k = ⟨X_kc|Y_kc⟩ + ⟨X_ks|Y_ks⟩``, ``b_k = ⟨X_kc|Y_ks⟩ − ⟨X_ks|Y_kc⟩``; the output stacks
    ``(a₀, a₁..a_N, b₁..b_N)``.
    """
    check_ndim(X, "X", (2,), "modulated queries (nq, F)")
    check_ndim(Y, "Y", (2,), "modulated database vectors (nb, F)")
    n = check_positive_int(n, "n")
    x0, xc, xs = _split(X, n, layout)
    y0, yc, ys = _split(Y, n, layout)
    a0 = x0 @ y0.T
    a = jnp.einsum("qdk,bdk->qbk", xc, yc) + jnp.einsum("qdk,bdk->qbk", xs, ys)
    b = jnp.einsum("qdk,bdk->qbk", xc, ys) - jnp.einsum("qdk,bdk->qbk", xs, yc)
    return jnp.concatenate([a0[..., None], a, b], axis=-1)


@partial(jax.jit, static_argnames=("n", "layout"))
def rotation_scores(
    X: jax.Array,
    Y: jax.Array,
    thetas: jax.Array,
    n: int = N_FREQ,
    layout: str = "interleaved",
) -> jax.Array:
    """Similarities ``(nq, nb, R)`` of queries rotated by each angle of ``thetas (R,)`` to ``Y``.

    Evaluates :func:`rotation_polynomial` on the grid; the rotation-invariant score is the max
    over the last axis (8 or 64 angles in the papers).
    """
    coef = rotation_polynomial(X, Y, n, layout)
    k = jnp.arange(1, n + 1, dtype=coef.dtype)
    ang = jnp.asarray(thetas, coef.dtype)[:, None] * k
    basis = jnp.concatenate(
        [jnp.ones((ang.shape[0], 1), coef.dtype), jnp.cos(ang), jnp.sin(ang)], 1
    )
    return coef @ basis.T


@partial(jax.jit, static_argnames=("n", "layout", "eps"))
def modulated_power_law(
    X: jax.Array,
    alpha: float = 0.0,
    n: int = N_FREQ,
    layout: str = "interleaved",
    eps: float = 1e-12,
) -> jax.Array:
    """Rotation-compatible power law (CVIU, [000] L5600–5645): per frequency ``k`` and component
    ``i`` the pair ``(X_kc,i, X_ks,i)`` is divided by its modulus to the power ``1 − α``; ``X₀``
    gets the signed power law ``sign(x)|x|^α``. Default α = 0 (unit modulus, modulated vectors).
    A zero pair stays zero. Follow it with ℓ2-normalisation.
    """
    check_floating(X, "X")
    n = check_positive_int(n, "n")
    X = jnp.asarray(X)
    x0, xc, xs = _split(X, n, layout)
    modulus = jnp.sqrt(xc**2 + xs**2)
    scale = jnp.where(modulus > eps, jnp.maximum(modulus, eps) ** (alpha - 1.0), 0.0)
    ci, si = _cos_sin_index(n, layout)
    R = X.reshape(*X.shape[:-1], -1, 2 * n + 1)
    R = R.at[..., ci].set(xc * scale).at[..., si].set(xs * scale)
    return R.at[..., 0].set(jnp.sign(x0) * jnp.abs(x0) ** alpha).reshape(X.shape)
