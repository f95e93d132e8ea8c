"""Local pre-processing of selected convolutional features: PCA to ``d`` dimensions, then ℓ2.

Seed 004, Sec. 4.1 (SPEC §10.2): ``x ← l2n(P_pca (x − µ))``, the PCA (no whitening) learned on the
masked local features of the learning set. The fitted transform is a :class:`jret.whitening.
Whitening` (mean ``m (K,)``, orthonormal rows ``P (d, K)``), applied by
:func:`jret.whitening.whiten_apply`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse.linalg import eigsh

from jret._checks import check_positive_int
from jret.whitening import Whitening, _as_fit_data, whiten_apply


def local_pca_learn(X: jax.Array, d: int) -> Whitening:
    """PCA of local features ``X (n, K)`` keeping ``d`` components, ``1 <= d <= K``.

    Returns ``Whitening(m (K,), P (d, K))`` whose rows are the leading eigenvectors of the
    covariance, by decreasing variance. Fitted on the host in float64; when ``d < K/4`` only the
    ``d`` leading eigenpairs are computed (Lanczos, ``scipy.sparse.linalg.eigsh`` to machine
    precision), which is an order of magnitude cheaper than the full ``K × K`` eigendecomposition
    for the 512–2048 channels of conv features.
    """
    X = _as_fit_data(X, "X")
    d = check_positive_int(d, "d")
    K = X.shape[1]
    if d > K:
        raise ValueError(f"d: expected at most K = {K}, got {d}")
    m = X.mean(0)
    Xc = X - m
    C = Xc.T @ Xc / len(X)
    C = (C + C.T) / 2
    if 4 * d < K:
        lam, E = eigsh(C, k=d, which="LA", v0=np.ones(K), tol=0)
    else:
        lam, E = np.linalg.eigh(C)
    order = np.argsort(lam)[::-1][:d]
    return Whitening(m=jnp.asarray(m, jnp.float32), P=jnp.asarray(E[:, order].T, jnp.float32))


def local_pca(x: jax.Array, pca: Whitening) -> jax.Array:
    """``l2n((x − m) @ Pᵀ)`` for local features ``(..., K)``, e.g. a padded set ``(N, M, K)``."""
    return whiten_apply(x, pca)
