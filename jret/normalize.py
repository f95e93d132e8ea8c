"""Vector normalisations used throughout retrieval pipelines.

Conventions follow the reference implementations of the methods (cirtorch, asmk):
``l2n(x) = x / (‖x‖₂ + eps)`` with ``eps = 1e-6``, so a zero row stays zero instead of
becoming NaN; the power law is signed (SPEC §1.2, §3.4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jret._checks import check_floating


def l2n(x: jax.Array, eps: float = 1e-6, axis: int = -1) -> jax.Array:
    """ℓ2-normalise ``x`` along ``axis``: ``x / (‖x‖₂ + eps)``; a zero vector stays zero.

    Args:
      x: array of any shape, e.g. descriptors ``(N, D)``.
      eps: added to the norm (default 1e-6, as cirtorch's ``L2N``).
      axis: the axis holding the vector components.
    """
    check_floating(x, "x")
    return x / (jnp.linalg.norm(x, axis=axis, keepdims=True) + eps)


def power_norm(x: jax.Array, a: float) -> jax.Array:
    """Signed power law ``sign(x)·|x|^a`` (Jégou et al.; SPEC §3.4), applied elementwise.

    Follow it with :func:`l2n`; ``a = 0.5`` is the usual choice for aggregated embeddings.
    """
    check_floating(x, "x")
    return jnp.sign(x) * jnp.abs(x) ** a
