"""Helpers shared by the embeddings: input checks and the floored PCA-whitening of embedded locals."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import check_floating, check_ndim
from jret.whitening import _as_fit_data

FIT_CHUNK = 4096
RELATIVE_FLOOR = 1e-12


def check_locals(x: jax.Array, anchors: jax.Array, name: str) -> None:
    """Locals ``x (..., d)`` floating and anchors ``(k, d)`` (named ``name``) of the same ``d``."""
    check_floating(x, "x")
    check_ndim(anchors, name, (2,), f"{name} (k, d)")
    if x.shape[-1] != anchors.shape[1]:
        raise ValueError(f"x and {name}: dimension mismatch, {x.shape} vs {name} {anchors.shape}")


def floored_whitening(
    embed: Callable[[np.ndarray], np.ndarray], X: np.ndarray, n_floor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``µ (D,)`` and whitening ``P = diag(λ^{−1/2}) Eᵀ (D, D)`` of ``embed(X)``.

    The covariance of the embedded vectors is accumulated over chunks of ``FIT_CHUNK`` rows of
    ``X`` (the last one zero-padded, its padding dropped) in float64; its eigenvalues
    (decreasing) have the smallest ``n_floor`` set to the ``n_floor``-th smallest (and all to at
    least ``1e-12 × λ_max``), as the triangulation-embedding reference code does; with
    ``n_floor >= D`` all are set to the smallest (a scaled rotation).
    """
    n = X.shape[0]
    total, scatter = None, None
    for start in range(0, n, FIT_CHUNK):
        rows = X[start : start + FIT_CHUNK]
        padded = np.concatenate([rows, np.zeros((FIT_CHUNK - len(rows), X.shape[1]), X.dtype)])
        Y = embed(padded)[: len(rows)]
        if total is None:
            total, scatter = np.zeros(Y.shape[1]), np.zeros((Y.shape[1],) * 2)
        total += Y.sum(0)
        scatter += Y.T @ Y
    mean = total / n
    cov = scatter / n - np.outer(mean, mean)
    lam, E = np.linalg.eigh((cov + cov.T) / 2)
    lam, E = lam[::-1], E[:, ::-1]
    if n_floor > 0:
        n_floor = min(n_floor, lam.size)
        lam[-n_floor:] = lam[-n_floor]
    lam = np.maximum(lam, RELATIVE_FLOOR * max(lam[0], RELATIVE_FLOOR))
    return mean, lam[:, None] ** -0.5 * E.T


def fit_embedding(
    X: jax.Array,
    anchors: jax.Array,
    name: str,
    raw: Callable[[jax.Array, jax.Array], jax.Array],
    n_floor: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Anchors, mean and floored whitening (float32) of the embedding ``raw(x, anchors)``.

    ``X (n, d)`` are the training locals and ``anchors (k, d)`` (named ``name`` in errors) their
    k-means centroids; ``raw`` (jitted by the caller) runs in float32 on chunks of ``X``, the
    moments and the eigendecomposition in float64 (:func:`floored_whitening`).
    """
    X = _as_fit_data(X, "X")
    C = _as_fit_data(anchors, name)
    if C.shape[1] != X.shape[1]:
        raise ValueError(f"{name}: expected dimension {X.shape[1]} (that of X), got {C.shape}")
    C = jnp.asarray(C, jnp.float32)
    mean, P = floored_whitening(
        lambda x: np.asarray(raw(jnp.asarray(x, jnp.float32), C), np.float64), X, n_floor
    )
    return C, jnp.asarray(mean, jnp.float32), jnp.asarray(P, jnp.float32)
