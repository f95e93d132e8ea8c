"""Global and regional pooling of CNN activation maps.

Every pooling takes a post-ReLU feature map ``x`` of shape ``(H, W, C)`` or a batch ``(N, H, W, C)``
and an optional boolean validity ``mask`` of shape ``(H, W)`` / ``(N, H, W)`` for maps padded to a
common size: masked positions are excluded from every max, sum and count. Outputs are
un-normalised ``(C,)`` / ``(N, C)`` (regional: ``(R, C)`` / ``(N, R, C)``).

References: MAC and R-MAC, Tolias, Sicre & Jégou, "Particular object retrieval with integral
max-pooling of CNN activations", ICLR 2016 (thesis [000] L1851–1910); SPoC, Babenko & Lempitsky,
ICCV 2015; GeM, Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018, eq. 1–5 ([000] L2582–2724).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import check_floating, check_ndim
from jret.normalize import l2n

if TYPE_CHECKING:
    from jret.whitening import Whitening

GEM_P_MIN = 1e-3


def _batched(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, bool]:
    """Validate and lift ``x`` to ``(N, H, W, C)`` and ``mask`` to ``(N, H, W)``."""
    check_ndim(x, "x", (3, 4), "a feature map (H, W, C) or a batch (N, H, W, C)")
    check_floating(x, "x")
    single = x.ndim == 3
    if single:
        x = x[None]
    if mask is None:
        mask = jnp.ones(x.shape[:3], dtype=bool)
    else:
        want = x.shape[1:3] if single else x.shape[:3]
        if tuple(np.shape(mask)) != tuple(want):
            raise ValueError(f"mask: expected shape {tuple(want)} to match x, got {np.shape(mask)}")
        mask = jnp.asarray(mask, dtype=bool)
        if single:
            mask = mask[None]
    return x, mask, single


def _unbatch(y: jax.Array, single: bool) -> jax.Array:
    return y[0] if single else y


def _count(mask: jax.Array) -> jax.Array:
    """Number of valid positions per map, ``(N, 1)``, at least 1 so empty maps pool to 0."""
    return jnp.maximum(mask.sum(axis=(1, 2)), 1)[:, None].astype(jnp.float32)


def mac(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """MAC: per-channel maximum over the valid positions, ``f_k = max_{x∈X_k} x`` ([000] L1851).

    An all-masked map pools to zeros.
    """
    x, mask, single = _batched(x, mask)
    m = mask[..., None]
    out = jnp.max(jnp.where(m, x, -jnp.inf), axis=(1, 2))
    out = jnp.where(mask.any(axis=(1, 2))[:, None], out, 0.0).astype(x.dtype)
    return _unbatch(out, single)


def spoc(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """SPoC: per-channel average over the valid positions ``(1/|X_k|) Σ x`` ([000] L2582–2600)."""
    x, mask, single = _batched(x, mask)
    total = jnp.sum(jnp.where(mask[..., None], x, 0.0), axis=(1, 2))
    return _unbatch((total / _count(mask)).astype(x.dtype), single)


def gem(
    x: jax.Array, p: float | jax.Array = 3.0, eps: float = 1e-6, mask: jax.Array | None = None
) -> jax.Array:
    """Generalized mean (GeM) pooling, TPAMI 2018 eq. 1: ``f_k = (mean_{x∈X_k} x^{p_k})^{1/p_k}``.

    Computed in the log domain, ``exp((logsumexp(p·log max(x, eps)) − log|X|) / p)``, which does not
    overflow for large p and gives the gradients of eq. 4–5 for both ``x`` and ``p`` under autodiff.
    ``p → ∞`` approaches MAC, ``p = 1`` is SPoC.

    Args:
      x: ``(H, W, C)`` or ``(N, H, W, C)`` activations (post-ReLU).
      p: the power, a scalar (shared, default 3.0) or a per-channel ``(C,)`` array; learnable.
        Clipped to ``>= 1e-3`` inside the op.
      eps: activations are clamped to ``>= eps`` before the power (default 1e-6, cirtorch).
      mask: optional validity mask; the mean divides by the number of valid positions.
    """
    x, mask, single = _batched(x, mask)
    p = jnp.asarray(p, dtype=jnp.float32)
    if p.ndim > 1 or (p.ndim == 1 and p.shape[0] not in (1, x.shape[-1])):
        raise ValueError(
            f"p: expected a scalar or a per-channel ({x.shape[-1]},) array, got {p.shape}"
        )
    p = jnp.maximum(p, GEM_P_MIN)
    logx = jnp.log(jnp.maximum(x.astype(jnp.float32), eps))
    lse = jax.nn.logsumexp(p * logx, axis=(1, 2), where=mask[..., None])
    out = jnp.exp((lse - jnp.log(_count(mask))) / p)
    out = jnp.where(mask.any(axis=(1, 2))[:, None], out, 0.0)
    return _unbatch(out.astype(x.dtype), single)


def weighted_spoc(x: jax.Array, w: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Weighted sum pooling ``Σ_p w_p · x_p`` over the valid positions (HOW training head, [003] L113).

    Args:
      x: ``(H, W, C)`` or ``(N, H, W, C)`` features.
      w: per-position weights ``(H, W)`` / ``(N, H, W)``, e.g. the HOW attention ``‖u_p‖₂``.
      mask: optional validity mask.

    Returns the un-normalised weighted sum ``(C,)`` / ``(N, C)``; HOW applies :func:`l2n` next.
    """
    x, mask, single = _batched(x, mask)
    w = jnp.asarray(w)
    if single:
        w = w[None] if w.ndim == 2 else w
    if w.shape != x.shape[:3]:
        raise ValueError(f"w: expected per-position weights of shape {x.shape[:3]}, got {w.shape}")
    w = jnp.where(mask, w, 0.0)
    out = jnp.einsum("nhw,nhwc->nc", w.astype(x.dtype), x)
    return _unbatch(out, single)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> np.ndarray:
    """The R-MAC region grid on an ``height × width`` map, as ``(R, 4)`` int32 boxes ``[y0, x0, y1, x1)``.

    Square regions at ``levels`` scales; at level l the side is ``floor(2·min(H, W)/(l + 1))``, with
    l regions along the short side and ``l + m − 1`` along the long one, m chosen so that
    consecutive regions overlap as close as possible to 40% ([000] L1892–1905; SPEC §2.2). The
    full-map region is *not* included (see :func:`rmac`).
    """
    if height <= 0 or width <= 0 or levels <= 0:
        raise ValueError(
            f"rmac_regions: expected positive height, width, levels; got {height, width, levels}"
        )
    w, w_long = min(height, width), max(height, width)
    steps = np.arange(2, 8)
    b = (w_long - w) / (steps - 1)
    extra = int(steps[np.argmin(np.abs((w - b) / w - overlap))] - 1) if height != width else 0
    e_w = extra if height < width else 0
    e_h = extra if height > width else 0
    boxes = []
    for level in range(1, levels + 1):
        side = int(np.floor(2 * w / (level + 1)))
        if side == 0:
            continue
        n_w, n_h = level + e_w, level + e_h
        starts_w = (
            [0] if n_w == 1 else [int(np.floor(j * (width - side) / (n_w - 1))) for j in range(n_w)]
        )
        starts_h = (
            [0]
            if n_h == 1
            else [int(np.floor(i * (height - side) / (n_h - 1))) for i in range(n_h)]
        )
        boxes += [(y0, x0, y0 + side, x0 + side) for y0 in starts_h for x0 in starts_w]
    return np.asarray(boxes, dtype=np.int32).reshape(-1, 4)


def _box_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """Boolean region masks ``(R, H, W)`` from half-open boxes ``(R, 4)`` = ``[y0, x0, y1, x1)``."""
    ys = jnp.arange(height)[None, :, None]
    xs = jnp.arange(width)[None, None, :]
    y0, x0, y1, x1 = (boxes[:, i, None, None] for i in range(4))
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


_POOLS: dict[str, Callable[..., jax.Array]] = {"mac": mac, "spoc": spoc, "gem": gem}


def regional(
    x: jax.Array,
    boxes: jax.Array,
    pool: str | Callable[..., jax.Array] = "mac",
    mask: jax.Array | None = None,
    **pool_kwargs,
) -> jax.Array:
    """Pool each box of ``boxes`` separately (regional MAC/SPoC/GeM; SPEC §2.3).

    Args:
      x: ``(H, W, C)`` or ``(N, H, W, C)`` feature map(s).
      boxes: ``(R, 4)`` integer boxes ``[y0, x0, y1, x1)`` in feature-map cells, shared by the batch;
        they may be traced.
      pool: ``'mac'``, ``'spoc'``, ``'gem'`` or any pooling with the signature ``pool(x, mask=...)``.
      mask: optional validity mask; a box pools only its valid cells (an empty box gives zeros).
      **pool_kwargs: forwarded to the pooling (e.g. ``p`` for GeM).

    Returns ``(R, C)`` / ``(N, R, C)`` regional vectors, regions sequentially so memory stays at one map.
    """
    xb, mask_b, single = _batched(x, mask)
    boxes = jnp.asarray(boxes)
    check_ndim(boxes, "boxes", (2,), "(R, 4) integer boxes [y0, x0, y1, x1)")
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected shape (R, 4), got {boxes.shape}")
    if not jnp.issubdtype(boxes.dtype, jnp.integer):
        raise ValueError(f"boxes: expected an integer dtype, got {boxes.dtype}")
    if isinstance(pool, str) and pool not in _POOLS:
        raise ValueError(f"pool: expected one of {sorted(_POOLS)} or a callable, got {pool!r}")
    fn = _POOLS[pool] if isinstance(pool, str) else pool
    region_masks = _box_masks(boxes, xb.shape[1], xb.shape[2])
    pooled = jax.lax.map(lambda rm: fn(xb, mask=mask_b & rm[None], **pool_kwargs), region_masks)
    return _unbatch(jnp.swapaxes(pooled, 0, 1), single)


def rmac(
    x: jax.Array,
    L: int = 3,
    eps: float = 1e-6,
    mask: jax.Array | None = None,
    whitening: Whitening | None = None,
) -> jax.Array:
    """R-MAC: sum of ℓ2-normalised regional MAC vectors over the R-MAC grid, ℓ2-normalised.

    Default (``whitening=None``, the reference-code form): regions of :func:`rmac_regions` at ``L``
    levels plus the full-map region, each MAC → ℓ2, summed, then ℓ2 (SPEC §2.2, ``cirtorch``).
    With a regional ``whitening`` (the ICLR 2016 form, [000] L1903–1910): each region MAC → ℓ2 →
    PCA-whitening → ℓ2, no full-map region, summed, then ℓ2.

    Args:
      x: ``(H, W, C)`` or ``(N, H, W, C)``.
      L: number of scales (default 3).
      eps: ℓ2 epsilon (default 1e-6).
      mask: optional validity mask (regions pool only valid cells).
      whitening: optional per-region :class:`jret.whitening.Whitening`.
    """
    check_ndim(x, "x", (3, 4), "a feature map (H, W, C) or a batch (N, H, W, C)")
    height, width = x.shape[-3], x.shape[-2]
    boxes = rmac_regions(height, width, L)
    if whitening is None:
        boxes = np.concatenate([np.array([[0, 0, height, width]], np.int32), boxes])
    vecs = l2n(regional(x, boxes, "mac", mask=mask), eps=eps)
    if whitening is not None:
        from jret.whitening import whiten_apply

        vecs = whiten_apply(vecs, whitening, eps=eps)
    return l2n(vecs.sum(axis=-2), eps=eps)
