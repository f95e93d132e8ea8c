"""Post-processing of aggregated vectors: rotation (RN), dropping the first components, power law.

Seed 004 §4.4 (SPEC §10.5, §14.1 #46). The order of the reference implementation, jret's default
(``order='reference'``), reproduces the paper's tables:

``ψ → l2n → centre → orthonormal PCA rotation (learned on ℓ2-normalised training aggregates)
→ drop the first `drop` coordinates → PN(α) → l2n``

with ``drop = 128`` for Temb and ``d(d+1)`` for F-FAemb, α = 0.5. ``order='seed'`` follows the text
(PN(α) and ℓ2 first, then the rotation and the truncation, then ℓ2). The rotation is a
:class:`jret.whitening.Whitening` with shrinkage 0: mean ``m (D,)`` and orthonormal rows ``P (D, D)``
by decreasing variance.
"""

from __future__ import annotations

import jax
import numpy as np

from jret._checks import check_floating
from jret.normalize import l2n, power_norm
from jret.whitening import Whitening, pca_whiten_learn

ORDERS = ("reference", "seed")
POWER = 0.5


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")


def rotation_input(psi: jax.Array, order: str = "reference", power: float = POWER) -> jax.Array:
    """The vectors the rotation is learned on and applied to: ``l2n(ψ)`` (reference) or
    ``l2n(PN_α(l2n(ψ)))`` (seed)."""
    _check_order(order)
    check_floating(psi, "psi")
    v = l2n(psi)
    return v if order == "reference" else l2n(power_norm(v, power))


def postprocess_learn(
    psi_train: jax.Array, order: str = "reference", power: float = POWER
) -> Whitening:
    """Learn the RN rotation on training aggregates ``ψ (n, D)`` (the learning set's images):
    the PCA (no whitening, host float64) of :func:`rotation_input`."""
    return pca_whiten_learn(rotation_input(psi_train, order, power), shrinkage=0.0)


def postprocess(
    psi: jax.Array,
    rotation: Whitening,
    drop: int = 128,
    power: float = POWER,
    order: str = "reference",
) -> jax.Array:
    """Final vectors ``(N, D − drop)`` from aggregates ``ψ (N, D)``.

    Args:
      psi: aggregated vectors ``(N, D)`` (or ``(D,)``).
      rotation: from :func:`postprocess_learn` with the same ``order`` and ``power``.
      drop: leading (largest-variance) coordinates removed after the rotation (default 128).
      power: power-law exponent α (default 0.5; 1 disables it).
      order: ``'reference'`` (default) or ``'seed'``, see the module docstring.
    """
    _check_order(order)
    check_floating(psi, "psi")
    D = rotation.P.shape[0]
    if psi.shape[-1] != D:
        raise ValueError(f"psi: expected last dimension {D} (the rotation's), got {psi.shape}")
    if isinstance(drop, bool) or not isinstance(drop, int | np.integer) or not 0 <= drop < D:
        raise ValueError(f"drop: expected an integer in [0, {D}), got {drop!r}")
    y = ((rotation_input(psi, order, power) - rotation.m) @ rotation.P.T)[..., drop:]
    return l2n(power_norm(y, power) if order == "reference" else y)
