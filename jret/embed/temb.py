"""Triangulation embedding φ_Δ (Jégou & Zisserman, CVPR 2014), as used by seed 004 (SPEC §10.3).

For an ℓ2-normalised local ``x (d,)`` and anchors ``c_1..c_k`` (k-means centroids):
``R(x) = [(x − c_j)/‖x − c_j‖]_{j=1..k} ∈ R^{dk}`` (centroid-major) and
``φ_Δ(x) = l2n(Σ^{−1/2} (R(x) − R̄))`` with ``R̄``, ``Σ`` the mean and covariance of ``R`` over the
training locals; the smallest 33 eigenvalues of ``Σ`` are floored to the 33rd smallest (the
reference code). After aggregation the first 128 components are dropped (:mod:`jret.embed.post`),
so the final dimension is ``d·k − 128`` (seed 004 Table 4: 512-D = d 32, k 20).
"""

from __future__ import annotations

import flax.struct
import jax

from jret.embed._common import check_locals, fit_embedding
from jret.normalize import l2n

TEMB_FLOOR = 33


@flax.struct.dataclass
class Temb:
    """Fitted triangulation embedding: anchors ``centroids (k, d)``, ``mean (k·d,)`` = R̄ and
    ``P (k·d, k·d)`` = Σ^{−1/2} (rows by decreasing variance)."""

    centroids: jax.Array
    mean: jax.Array
    P: jax.Array

    @property
    def dim(self) -> int:
        return self.P.shape[0]


def triangulation_residuals(x: jax.Array, centroids: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``R(x)``: ℓ2-normalised residuals to every anchor, ``(..., d)`` → ``(..., k·d)``.

    Block ``j`` holds ``l2n(x − c_j)`` (``eps`` = 1e-6); a local equal to an anchor gets a zero
    block there.
    """
    check_locals(x, centroids, "centroids")
    r = l2n(x[..., None, :] - centroids, eps=eps)
    return r.reshape(*x.shape[:-1], -1)


_residuals_jit = jax.jit(triangulation_residuals)


def temb_learn(X: jax.Array, centroids: jax.Array, n_floor: int = TEMB_FLOOR) -> Temb:
    """Fit R̄ and Σ^{−1/2} on training locals ``X (n, d)`` (ℓ2-normalised, after local PCA).

    Args:
      X: training locals ``(n, d)``, never the test set.
      centroids: anchors ``(k, d)`` from k-means on ``X``.
      n_floor: number of smallest eigenvalues floored (default 33, the reference code).

    The moments are accumulated on the host in float64, in chunks of locals.
    """
    C, mean, P = fit_embedding(X, centroids, "centroids", _residuals_jit, n_floor)
    return Temb(centroids=C, mean=mean, P=P)


def temb(x: jax.Array, params: Temb) -> jax.Array:
    """φ_Δ of locals ``(..., d)`` → ``(..., k·d)``: ``l2n((R(x) − R̄) @ Pᵀ)``."""
    return l2n((triangulation_residuals(x, params.centroids) - params.mean) @ params.P.T)
