"""Aggregation ψ of embedded local sets into one vector per image (seed 004 §4.3, SPEC §10.4).

Embedded locals come as a padded set ``phi (N, M, D)`` (or one set ``(M, D)``) with a boolean
``mask (N, M)``; masked rows never contribute.

* ψ_s: sum pooling ``Σ_i φ_i``.
* ψ_d: democratic aggregation (Jégou & Zisserman, CVPR 2014): weights ``λ_i ≥ 0`` such that every
  local contributes equally to the similarity with the aggregate,
  ``λ_i φ_iᵀ Σ_j λ_j φ_j = const ∀i``, on the kernel ``K = max(ΦΦᵀ, 0)`` of ℓ2-normalised φ.
  The weights come from the damped Sinkhorn scaling of the reference code: ``λ = 1``, then
  ``δ = (colsum K)^{−0.5}``, ``K ← diag(δ) K diag(δ)``, ``λ ← λ ⊙ δ``, 10 times (the reference)
  and further until the balance holds to a relative 1e-5; ``ψ_d = Σ_i λ_i φ_i``. The scaled
  kernel's column sums are ``λ_i (K₀λ)_i``, so its fixed point ``colsum K = 1`` is the balance
  condition above.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jret._checks import check_positive_int
from jret.masks import batched

DEMOCRATIC_ITERS = 10
DEMOCRATIC_DAMPING = 0.5
DEMOCRATIC_TOL = 1e-5
DEMOCRATIC_MAX_ITERS = 100


def _batched(phi: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, bool]:
    """``phi`` as ``(N, M, D)`` and ``mask`` as ``(N, M)`` bool (:func:`jret.masks.batched`)."""
    what = "embedded locals (M, D) or a padded batch (N, M, D)"
    return batched(phi, mask, 2, "phi", what, "mask")


def sum_pool(phi: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ψ_s: ``Σ_i φ_i`` over the unmasked locals, ``(N, M, D)`` → ``(N, D)`` (``(M, D)`` → ``(D,)``)."""
    phi, mask, single = _batched(phi, mask)
    out = jnp.einsum("nm,nmd->nd", mask.astype(phi.dtype), phi)
    return out[0] if single else out


def democratic_kernel(phi: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``K = max(ΦΦᵀ, 0)`` per image ``(N, M, M)``, zero on masked rows and columns."""
    phi, mask, single = _batched(phi, mask)
    gram = jnp.maximum(jnp.einsum("nid,njd->nij", phi, phi), 0.0)
    both = mask[:, :, None] & mask[:, None, :]
    K = jnp.where(both, gram, 0.0)
    return K[0] if single else K


def _spread(s: jax.Array) -> jax.Array:
    """Relative spread ``(max − min)/mean`` ``(N,)`` of each image's positive column sums."""
    pos = s > 0
    hi = jnp.max(jnp.where(pos, s, -jnp.inf), axis=1)
    lo = jnp.min(jnp.where(pos, s, jnp.inf), axis=1)
    mean = jnp.sum(s, axis=1) / jnp.maximum(jnp.sum(pos, axis=1), 1)
    return jnp.where(pos.any(axis=1), (hi - lo) / mean, 0.0)


@partial(jax.jit, static_argnames=("iters", "damping", "tol", "max_iters"))
def democratic_weights(
    phi: jax.Array,
    mask: jax.Array | None = None,
    iters: int = DEMOCRATIC_ITERS,
    damping: float = DEMOCRATIC_DAMPING,
    tol: float | None = DEMOCRATIC_TOL,
    max_iters: int = DEMOCRATIC_MAX_ITERS,
) -> jax.Array:
    """Democratic weights ``λ`` ``(N, M)`` (``(M,)`` for one set) by damped Sinkhorn scaling.

    Args:
      phi: ℓ2-normalised embedded locals ``(N, M, D)`` or ``(M, D)``.
      mask: valid locals ``(N, M)``; masked locals get weight 0.
      iters: scaling iterations always run (default 10, the reference code).
      damping: exponent of the column sums (default 0.5).
      tol: keep scaling an image while its balance ``λ_i (Kλ)_i`` spreads by more than ``tol``
        relative to its mean (default 1e-5), up to ``max_iters`` (100); ``None`` stops at
        ``iters`` exactly, as the reference code does. Each image stops on its own, so its
        weights do not depend on the other images of the batch.

    Locals with a zero column sum (e.g. all-zero φ) get weight 0 instead of inf.
    """
    iters = check_positive_int(iters, "iters")
    max_iters = max(check_positive_int(max_iters, "max_iters"), iters)
    phi, mask, single = _batched(phi, mask)
    K = democratic_kernel(phi, mask)

    def active(i, K):
        """``(N,)``: the images scaled at iteration ``i``."""
        more = jnp.zeros(K.shape[0], bool) if tol is None else _spread(jnp.sum(K, axis=1)) > tol
        return (i < iters) | ((i < max_iters) & more)

    def step(carry):
        i, K, lam = carry
        s = jnp.sum(K, axis=1)
        delta = jnp.where(s > 0, jnp.where(s > 0, s, 1.0) ** -damping, 0.0)
        delta = jnp.where(active(i, K)[:, None], delta, 1.0)
        return i + 1, K * delta[:, :, None] * delta[:, None, :], lam * delta

    def cond(carry):
        i, K, _ = carry
        return jnp.any(active(i, K))

    _, _, lam = lax.while_loop(cond, step, (0, K, mask.astype(phi.dtype)))
    return lam[0] if single else lam


@partial(jax.jit, static_argnames=("iters", "damping", "tol"))
def democratic(
    phi: jax.Array,
    mask: jax.Array | None = None,
    iters: int = DEMOCRATIC_ITERS,
    damping: float = DEMOCRATIC_DAMPING,
    tol: float | None = DEMOCRATIC_TOL,
) -> jax.Array:
    """ψ_d: ``Σ_i λ_i φ_i`` with :func:`democratic_weights`; ``(N, M, D)`` → ``(N, D)``."""
    lam = democratic_weights(phi, mask, iters, damping, tol)
    return sum_pool(phi * lam[..., None], None if mask is None else mask)
