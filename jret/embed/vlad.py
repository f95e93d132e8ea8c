"""VLAD as a per-local embedding (Jégou et al., CVPR 2010; seed 004 §5.2.1, SPEC §10.3).

Following the decomposition of embedding and aggregation used in seed 004, a local ``x (d,)`` maps
to ``φ(x) = [1[q(x) = j] (x − c_j)]_{j=1..k} ∈ R^{d·k}`` (centroid-major), ``q(x)`` the nearest
centroid (ties: the lower index). Sum aggregation of φ is the VLAD vector; democratic aggregation
can be applied to ℓ2-normalised φ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jret.embed._common import check_locals


def vlad(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Per-local VLAD embedding ``(..., d)`` → ``(..., k·d)``: the residual to the nearest centroid
    in its block, zeros elsewhere."""
    check_locals(x, centroids, "centroids")
    dist = jnp.sum((x[..., None, :] - centroids) ** 2, axis=-1)
    onehot = jax.nn.one_hot(jnp.argmin(dist, axis=-1), centroids.shape[0], dtype=x.dtype)
    return (onehot[..., None] * (x[..., None, :] - centroids)).reshape(*x.shape[:-1], -1)
