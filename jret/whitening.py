"""Whitening of global descriptors: PCA-whitening and the learned whitening Lw.

A whitening is the pytree :class:`Whitening` ``(m: (D,), P: (D', D))`` applied as
``y = l2n((x − m) @ Pᵀ)``. Fitting runs on the host in float64 (eigendecompositions and Cholesky
are ill-conditioned in float32) and returns float32 arrays.

References: PCA-whitening, Jégou & Chum, ECCV 2012 ([000] L2137–2138); learned whitening Lw,
Radenović, Tolias & Chum, TPAMI 2018, Sec. 3.3 ([000] L2804–2852), after Mikolajczyk & Matas.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import (
    check_finite,
    check_floating,
    check_integer,
    check_ndim,
    check_nonempty,
)
from jret.normalize import l2n

EIG_FLOOR = 1e-14


@flax.struct.dataclass
class Whitening:
    """A learned linear whitening: mean ``m (D,)`` and projection ``P (D', D)``, rows sorted by
    decreasing variance so that truncating to the first rows reduces the dimension."""

    m: jax.Array
    P: jax.Array

    @property
    def dim(self) -> int:
        return self.P.shape[0]


def _as_fit_data(X, name: str = "X") -> np.ndarray:
    check_ndim(X, name, (2,), "descriptors (N, D)")
    check_floating(X, name)
    check_nonempty(X, name)
    check_finite(X, name)
    return np.asarray(X, dtype=np.float64)


def _eigh_desc(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    lam, E = np.linalg.eigh((C + C.T) / 2)
    order = np.argsort(lam)[::-1]
    return lam[order], E[:, order]


def _whitening(m: np.ndarray, P: np.ndarray, dims: int | None) -> Whitening:
    if dims is not None:
        if not 0 < dims <= P.shape[0]:
            raise ValueError(f"dims: expected 1..{P.shape[0]}, got {dims}")
        P = P[:dims]
    return Whitening(m=jnp.asarray(m, jnp.float32), P=jnp.asarray(P, jnp.float32))


def pca_whiten_learn(X: jax.Array, shrinkage: float = 1.0, dims: int | None = None) -> Whitening:
    """PCA-whitening ``P = Λ^{−s/2} Eᵀ`` of the covariance ``C = (X − m)ᵀ(X − m)/n``.

    Jégou & Chum, ECCV 2012; the shrinkage exponent ``s`` is HOW's (Tolias et al., ECCV 2020):
    ``s = 1`` (default) whitens fully, ``s = 0`` only rotates. Eigenvalues are clipped at 1e-14.

    Args:
      X: fitting descriptors ``(n, D)`` (usually ℓ2-normalised), never the test set.
      shrinkage: the exponent s (default 1.0).
      dims: keep the ``dims`` directions of largest variance (default: all D).
    """
    X = _as_fit_data(X)
    m = X.mean(axis=0)
    Xc = X - m
    return pca_whiten_from_moments(m, Xc.T @ Xc / X.shape[0], shrinkage, dims)


def pca_whiten_from_moments(
    m: np.ndarray, C: np.ndarray, shrinkage: float = 1.0, dims: int | None = None
) -> Whitening:
    """:func:`pca_whiten_learn` from the mean ``m (D,)`` and covariance ``C (D, D)`` of the fitting
    descriptors, for sets too large to hold at once (accumulate ``Σx`` and ``Σxxᵀ`` in float64,
    e.g. HOW's 5,000 training images × 1,000 descriptors)."""
    m, C = np.asarray(m, np.float64), np.asarray(C, np.float64)
    if m.ndim != 1 or C.shape != (m.size, m.size):
        raise ValueError(f"m, C: expected (D,) and (D, D), got {m.shape} and {C.shape}")
    check_finite(C, "C")
    lam, E = _eigh_desc(C)
    P = np.maximum(lam, EIG_FLOOR)[:, None] ** (-shrinkage / 2) * E.T
    return _whitening(m, P, dims)


def _pair_indices(qidx, pidx, n: int) -> tuple[np.ndarray, np.ndarray]:
    for name, idx in (("qidx", qidx), ("pidx", pidx)):
        check_ndim(idx, name, (1,), "a 1-D array of indices")
        check_integer(idx, name)
    qidx, pidx = np.asarray(qidx), np.asarray(pidx)
    if qidx.shape != pidx.shape:
        raise ValueError(
            f"qidx and pidx: expected the same length, got {qidx.shape} and {pidx.shape}"
        )
    if qidx.size == 0:
        raise ValueError("qidx: expected at least one matching pair, got none")
    for name, idx in (("qidx", qidx), ("pidx", pidx)):
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(
                f"{name}: indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]"
            )
    return qidx, pidx


def _cholesky_jitter(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``S``, adding ``α·I`` (α = 1e-10, ×10 per failure) until it exists."""
    alpha = 0.0
    while True:
        try:
            return np.linalg.cholesky(S + alpha * np.eye(S.shape[0]))
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0.0 else alpha * 10


def _inv_sqrt(S: np.ndarray) -> np.ndarray:
    lam, E = _eigh_desc(S)
    return (E * np.maximum(lam, EIG_FLOOR) ** -0.5) @ E.T


def lw_learn(
    X: jax.Array,
    qidx: jax.Array,
    pidx: jax.Array,
    variant: str = "cirtorch",
    neg_pairs: tuple[jax.Array, jax.Array] | None = None,
    dims: int | None = None,
) -> Whitening:
    """Learned whitening Lw (Radenović et al., TPAMI 2018, Sec. 3.3; [000] L2804–2852).

    Whiten the intra-class covariance — the scatter of matching-pair differences
    ``C_S = Σ (x_q − x_p)(x_q − x_p)ᵀ`` — then rotate by the PCA of the whitened inter-class
    scatter, keeping the directions of largest variance first.

    ``variant='cirtorch'`` (default, the form behind the published numbers): centre with the mean
    of the query vectors; ``P1 = L⁻¹`` from the Cholesky factor of ``C_S/n_pairs``; eigenvectors V of
    the whitened total scatter ``P1 (X − m)(X − m)ᵀ P1ᵀ``; ``P = Vᵀ P1``.
    ``variant='paper'``: centre with the mean of all vectors; ``P = Vᵀ C_S^{−1/2}`` with V the
    eigenvectors of ``C_S^{−1/2} C_D C_S^{−1/2}``, C_D the scatter of the non-matching pairs
    ``neg_pairs`` (or, when None, the total covariance of X).

    Args:
      X: fitting descriptors ``(n, D)``, ℓ2-normalised, from the training set.
      qidx, pidx: ``(n_pairs,)`` indices into X of matching (query, positive) pairs.
      variant: ``'cirtorch'`` or ``'paper'``.
      neg_pairs: optional ``(a, b)`` index arrays of non-matching pairs (``'paper'`` only).
      dims: output dimension (default D).
    """
    X = _as_fit_data(X)
    qidx, pidx = _pair_indices(qidx, pidx, X.shape[0])
    diff = X[qidx] - X[pidx]
    S = diff.T @ diff / diff.shape[0]
    if variant == "cirtorch":
        m = X[qidx].mean(axis=0)
        P1 = np.linalg.inv(_cholesky_jitter(S))
        Xw = (X - m) @ P1.T
        _, V = _eigh_desc(Xw.T @ Xw)
    elif variant == "paper":
        m = X.mean(axis=0)
        P1 = _inv_sqrt(S)
        if neg_pairs is None:
            Xc = X - m
            C_D = Xc.T @ Xc / X.shape[0]
        else:
            a, b = _pair_indices(*neg_pairs, X.shape[0])
            d = X[a] - X[b]
            C_D = d.T @ d / d.shape[0]
        _, V = _eigh_desc(P1 @ C_D @ P1.T)
    else:
        raise ValueError(f"variant: expected 'cirtorch' or 'paper', got {variant!r}")
    return _whitening(m, V.T @ P1, dims)


def whiten_apply(
    X: jax.Array, w: Whitening, dims: int | None = None, eps: float = 1e-6
) -> jax.Array:
    """Apply a whitening and ℓ2-normalise: ``l2n((X − m) @ P[:dims]ᵀ)`` (SPEC §3.3).

    Args:
      X: descriptors ``(..., D)``, e.g. ``(N, D)`` or regional ``(N, R, D)``.
      w: the :class:`Whitening`.
      dims: truncate to the first ``dims`` output dimensions (default: all of ``w``).
      eps: ℓ2 epsilon (default 1e-6).

    Returns ``(..., dims)`` ℓ2-normalised rows.
    """
    check_floating(X, "X")
    if X.shape[-1] != w.P.shape[1]:
        raise ValueError(
            f"X: expected last dimension {w.P.shape[1]} (the whitening's input), got {X.shape}"
        )
    P = w.P if dims is None else w.P[:dims]
    if dims is not None and not 0 < dims <= w.P.shape[0]:
        raise ValueError(f"dims: expected 1..{w.P.shape[0]}, got {dims}")
    return l2n((X - w.m) @ P.T, eps=eps)
