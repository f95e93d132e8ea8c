"""Metric-learning losses on ℓ2-normalised descriptors (SPEC §4.3).

Label convention: ``labels = 1`` marks a matching pair (anchor, other), ``0`` a non-matching one.
The reference tuples ``(query, positive, n_1, …, n_k)`` become ``anchor = query``,
``others = (positive, n_1, …, n_k)`` and ``labels = (1, 0, …, 0)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jret._checks import check_floating, check_ndim, check_same_dim

REDUCTIONS = ("sum", "mean")


def _check(anchor, others, labels, reduction: str) -> None:
    check_ndim(anchor, "anchor", (1, 2), "anchor (D,) or a batch of tuples (B, D)")
    check_ndim(
        others, "others", (anchor.ndim + 1,), f"others with {anchor.ndim + 1} dims (…, n, D)"
    )
    check_floating(anchor, "anchor")
    check_floating(others, "others")
    check_same_dim(anchor, others, "anchor", "others")
    if jnp.shape(labels) != jnp.shape(others)[:-1]:
        raise ValueError(
            f"labels: expected shape {jnp.shape(others)[:-1]} (one per row of others), "
            f"got {jnp.shape(labels)}"
        )
    if anchor.ndim == 2 and anchor.shape[0] != others.shape[0]:
        raise ValueError(f"anchor and others: batch mismatch, {anchor.shape} vs {others.shape}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def _reduce(x: jax.Array, reduction: str) -> jax.Array:
    return jnp.sum(x) if reduction == "sum" else jnp.mean(x)


def contrastive_loss(
    anchor: jax.Array,
    others: jax.Array,
    labels: jax.Array,
    margin: float = 0.7,
    eps: float = 1e-6,
    reduction: str = "sum",
) -> jax.Array:
    """Contrastive loss of Radenović et al. (GeM TPAMI Eq. 4; [000] L2771–2803).

    ``L = ½ d²`` for a matching pair and ``L = ½ max(0, margin − d)²`` otherwise, with
    ``d = ‖a − b + eps‖`` as in the reference code, summed over all pairs (``reduction='sum'``,
    default, the reference) or averaged (``'mean'``).

    Args:
      anchor: ``(D,)`` or ``(B, D)`` ℓ2-normalised anchors (queries).
      others: ``(n, D)`` or ``(B, n, D)`` descriptors paired with the anchor.
      labels: ``(n,)`` or ``(B, n)``; 1 for a matching pair, 0 for a non-matching one.
      margin: τ (default 0.7; 0.85 for the ResNet-101 GeM recipe, 0.8 for HOW).
      eps: added to the difference before the norm (default 1e-6).
      reduction: ``'sum'`` (default) or ``'mean'``.

    Returns:
      The scalar loss.
    """
    _check(anchor, others, labels, reduction)
    d = jnp.linalg.norm(anchor[..., None, :] - others + eps, axis=-1)
    y = jnp.asarray(labels, d.dtype)
    pair = 0.5 * y * d**2 + 0.5 * (1 - y) * jnp.maximum(margin - d, 0.0) ** 2
    return _reduce(pair, reduction)


def triplet_loss(
    anchor: jax.Array,
    others: jax.Array,
    labels: jax.Array,
    margin: float = 0.1,
    reduction: str = "sum",
) -> jax.Array:
    """Triplet loss with squared distances, as the reference code (SPEC §4.3; [000] L3247).

    ``L = Σ_n max(0, ‖a − p‖² − ‖a − n‖² + margin)`` over the negatives of each tuple; the tuple
    holds exactly one positive (``labels == 1``), every other row is a negative.

    Args:
      anchor: ``(D,)`` or ``(B, D)``.
      others: ``(n, D)`` or ``(B, n, D)``: one positive and ``n − 1`` negatives per tuple.
      labels: ``(n,)`` or ``(B, n)``, one entry equal to 1 per tuple.
      margin: m (default 0.1, the NetVLAD value; 0.5 with FC whitening).
      reduction: ``'sum'`` (default) or ``'mean'`` over the (anchor, negative) terms.

    Returns:
      The scalar loss.
    """
    _check(anchor, others, labels, reduction)
    d2 = jnp.sum((anchor[..., None, :] - others) ** 2, axis=-1)
    pos = jnp.asarray(labels) == 1
    d_pos = jnp.sum(jnp.where(pos, d2, 0.0), axis=-1, keepdims=True)
    terms = jnp.maximum(d_pos - d2 + margin, 0.0)
    if reduction == "sum":
        return jnp.sum(jnp.where(pos, 0.0, terms))
    return jnp.sum(jnp.where(pos, 0.0, terms)) / jnp.maximum(jnp.sum(~pos), 1)
