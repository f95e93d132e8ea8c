"""F-FAemb: fast function-approximation-based embedding (Do & Cheung; seed 004 §4.2, SPEC §10.3).

A local ``x (d,)`` (ℓ2-normalised, after local PCA) is approximated by bases ``b_1..b_k`` (k-means
centroids) with coefficients ``γ(x)`` solving the locality-regularised, affine-constrained least
squares of the reference implementation:

``γ = argmin ‖x − Bᵀγ‖² + µ a(x) ‖γ‖²`` s.t. ``1ᵀγ = 1``, with ``a(x) = Σ_j ‖x − b_j‖₁³``, i.e.
``γ = G⁻¹(Bx − λ1)``, ``G = BBᵀ + µ a(x) I``, ``λ = (1ᵀG⁻¹Bx − 1)/(1ᵀG⁻¹1)`` (µ = 1e-2).

The embedding stacks, per base, ``γ_j(x) · vec_u(r_j r_jᵀ)`` with ``r_j = l2n(x − b_j)`` and
``vec_u`` the upper triangle, diagonal included, row by row (``d(d+1)/2`` values; dimension
``k·d(d+1)/2``); it is then centred and whitened with the smallest 129 eigenvalues floored, and
ℓ2-normalised. After aggregation seed 004 drops the first ``d(d+1)`` components (rather than
``d(d+1)/2``), giving ``(k − 2)·d(d+1)/2`` dimensions (Table 2: d 32, k 10 → 4224).
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jret.embed._common import check_locals, fit_embedding
from jret.normalize import l2n

FAEMB_MU = 1e-2
FAEMB_FLOOR = 129


@flax.struct.dataclass
class FAemb:
    """Fitted F-FAemb: ``bases (k, d)``, ``mean (D,)`` and whitening ``P (D, D)``,
    ``D = k·d(d+1)/2``; ``mu`` is the locality weight."""

    bases: jax.Array
    mean: jax.Array
    P: jax.Array
    mu: float = flax.struct.field(pytree_node=False, default=FAEMB_MU)

    @property
    def dim(self) -> int:
        return self.P.shape[0]


def faemb_coefficients(x: jax.Array, bases: jax.Array, mu: float = FAEMB_MU) -> jax.Array:
    """Coefficients ``γ(x)`` ``(..., k)`` of locals ``(..., d)`` over ``bases (k, d)``; Σγ = 1.

    Uses one eigendecomposition ``BBᵀ = E S Eᵀ``, so ``G⁻¹v = E (Eᵀv / (S + µa))`` per local.
    """
    check_locals(x, bases, "bases")
    s, E = jnp.linalg.eigh(bases @ bases.T)
    a = jnp.sum(jnp.sum(jnp.abs(x[..., None, :] - bases), axis=-1) ** 3, axis=-1)
    denom = s + mu * a[..., None]

    def g_inv(v: jax.Array) -> jax.Array:
        return ((v @ E) / denom) @ E.T

    bx = x @ bases.T
    inv_bx, inv_one = g_inv(bx), g_inv(jnp.ones_like(bx))
    lam = (jnp.sum(inv_bx, -1) - 1.0) / jnp.sum(inv_one, -1)
    return inv_bx - lam[..., None] * inv_one


def faemb_raw(x: jax.Array, bases: jax.Array, mu: float = FAEMB_MU) -> jax.Array:
    """Un-whitened embedding ``[γ_j(x) vec_u(r_j r_jᵀ)]_j`` of locals ``(..., d)`` → ``(..., k·d(d+1)/2)``."""
    check_locals(x, bases, "bases")
    gamma = faemb_coefficients(x, bases, mu)
    r = l2n(x[..., None, :] - bases)
    iu, ju = np.triu_indices(bases.shape[1])
    outer = r[..., iu] * r[..., ju]
    return (gamma[..., None] * outer).reshape(*x.shape[:-1], -1)


_faemb_raw_jit = jax.jit(faemb_raw, static_argnames="mu")


def faemb_learn(
    X: jax.Array, bases: jax.Array, mu: float = FAEMB_MU, n_floor: int = FAEMB_FLOOR
) -> FAemb:
    """Fit the centring and floored whitening of F-FAemb on training locals ``X (n, d)``.

    Args:
      X: ℓ2-normalised training locals ``(n, d)``.
      bases: ``(k, d)`` k-means centroids of ``X``.
      mu: locality weight µ (default 1e-2, the recommended value).
      n_floor: smallest eigenvalues floored (default 129, the reference code).
    """
    raw = partial(_faemb_raw_jit, mu=mu)
    bases, mean, P = fit_embedding(X, bases, "bases", raw, n_floor)
    return FAemb(bases=bases, mean=mean, P=P, mu=mu)


def faemb(x: jax.Array, params: FAemb) -> jax.Array:
    """F-FAemb of locals ``(..., d)`` → ``(..., k·d(d+1)/2)``: ``l2n((raw − µ) @ Pᵀ)``."""
    return l2n((faemb_raw(x, params.bases, params.mu) - params.mean) @ params.P.T)
