"""Selection masks over convolutional feature maps: SIFT-, MAX- and SUM-masks.

Do, Hoang et al., "Selective deep convolutional features for image retrieval" (seed 004, Sec. 3.2,
eq. 1–3; SPEC §10.1). A mask keeps a subset of the ``H × W`` local features of a post-ReLU map
``F: (H, W, C)`` (or a batch ``(N, H, W, C)``) and is returned as a boolean ``(H, W)`` /
``(N, H, W)`` array:

* MAX (eq. 2): for every channel ``k`` the location of its maximum, ``argmax_{(x,y)} F⁽ᵏ⁾``; the
  union over channels (at most ``C`` locations).
* SUM (eq. 3): ``Σ(x, y) = Σ_k F⁽ᵏ⁾(x, y)``; keep ``Σ ≥ median(Σ)`` (per map; ties kept, so at
  least half of the locations).
* SIFT (eq. 1): OpenCV SIFT keypoints of the image mapped to the feature grid.

Maps padded into a common batch pass a validity mask ``valid`` (``(H, W)`` / ``(N, H, W)``):
padded cells are never selected and do not enter the median. :func:`masked_locals` turns a map and
a mask into the padded local set ``(N, H·W, C)`` + mask that :mod:`jret.embed` consumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import check_finite, check_floating, check_ndim, check_positive_int

MAP_SHAPES = "a feature map (H, W, C) or a batch (N, H, W, C)"


def batched(
    x: jax.Array, mask: jax.Array | None, item_ndim: int, name: str, what: str, mask_name: str
) -> tuple[jax.Array, jax.Array, bool]:
    """Lift ``x``, one item of rank ``item_ndim`` or a batch of them, to a batch, and ``mask``
    over the item's leading axes (e.g. ``(H, W)`` of a map ``(H, W, C)``) to a batch of bool
    masks, all True when ``mask`` is None. Returns ``(x, mask, single)``; checks shapes and that
    ``x`` (named ``name``, described by ``what``) is floating."""
    check_ndim(x, name, (item_ndim, item_ndim + 1), what)
    check_floating(x, name)
    x = jnp.asarray(x)
    single = x.ndim == item_ndim
    if single:
        x = x[None]
    if mask is None:
        return x, jnp.ones(x.shape[:-1], bool), single
    want = x.shape[1:-1] if single else x.shape[:-1]
    if tuple(np.shape(mask)) != tuple(want):
        raise ValueError(
            f"{mask_name}: expected shape {tuple(want)} to match {name}, got {np.shape(mask)}"
        )
    mask = jnp.asarray(mask, bool)
    return x, mask[None] if single else mask, single


def _maps(fm: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array, bool]:
    """``fm`` as ``(N, H, W, C)`` and ``valid`` as ``(N, H, W)`` bool (:func:`batched`)."""
    return batched(fm, valid, 3, "fm", MAP_SHAPES, "valid")


def max_mask(
    fm: jax.Array, valid: jax.Array | None = None, order: str = "C", validate: bool = True
) -> jax.Array:
    """MAX-mask (seed 004 eq. 2): the arg-max location of every channel, united over channels.

    Args:
      fm: post-ReLU feature map ``(H, W, C)`` or batch ``(N, H, W, C)``.
      valid: optional validity mask ``(H, W)`` / ``(N, H, W)`` of padded maps.
      order: tie-break among equal maxima: ``'C'`` (default) the first location in row-major
        ``(y, x)`` order, ``'F'`` the first in column-major order (the MATLAB reference).
      validate: reject NaN/inf in a concrete ``fm`` (no-op under ``jit``).

    Returns a boolean mask ``(H, W)`` / ``(N, H, W)``; a map without valid cells selects nothing.
    """
    if order not in ("C", "F"):
        raise ValueError(f"order: expected 'C' or 'F', got {order!r}")
    fm, valid, single = _maps(fm, valid)
    if validate:
        check_finite(fm, "fm")
    mask = _max_mask(fm, valid, order)
    return mask[0] if single else mask


@partial(jax.jit, static_argnames="order")
def _max_mask(fm: jax.Array, valid: jax.Array, order: str) -> jax.Array:
    x = jnp.where(valid[..., None], fm, -jnp.inf)
    if order == "F":
        x = jnp.swapaxes(x, 1, 2)
    n, h, w, c = x.shape
    idx = jnp.argmax(x.reshape(n, h * w, c), axis=1)
    idx = jnp.where(valid.any(axis=(1, 2))[:, None], idx, h * w)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], idx.shape)
    mask = jnp.zeros((n, h * w), bool).at[rows, idx].set(True, mode="drop").reshape(n, h, w)
    return jnp.swapaxes(mask, 1, 2) if order == "F" else mask


def sum_mask(fm: jax.Array, valid: jax.Array | None = None, validate: bool = True) -> jax.Array:
    """SUM-mask (seed 004 eq. 3): keep locations whose channel sum is at least the median.

    ``Σ(x, y) = Σ_k F⁽ᵏ⁾(x, y)`` and ``α = median(Σ)`` over the valid locations of each map (the
    mean of the two middle values for an even count); ``Σ ≥ α`` is kept, so ties are kept.

    Args:
      fm: post-ReLU feature map ``(H, W, C)`` or batch ``(N, H, W, C)``.
      valid: optional validity mask ``(H, W)`` / ``(N, H, W)``.
      validate: reject NaN/inf in a concrete ``fm`` (no-op under ``jit``).

    Returns a boolean mask ``(H, W)`` / ``(N, H, W)``.
    """
    fm, valid, single = _maps(fm, valid)
    if validate:
        check_finite(fm, "fm")
    mask = _sum_mask(fm, valid)
    return mask[0] if single else mask


@jax.jit
def _sum_mask(fm: jax.Array, valid: jax.Array) -> jax.Array:
    s = jnp.sum(fm, axis=-1)
    med = jnp.nanmedian(jnp.where(valid, s, jnp.nan).reshape(s.shape[0], -1), axis=1)
    return valid & (s >= med[:, None, None])


def masked_locals(
    fm: jax.Array, mask: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The local features of ``fm`` as a padded set: ``(N, H·W, C)`` and its mask ``(N, H·W)``.

    Row ``y·W + x`` holds ``F(y, x)``; its mask entry is ``mask & valid`` there (SPEC §10.1).
    Single maps give ``(H·W, C)`` and ``(H·W,)``.
    """
    mask = batched(fm, mask, 3, "fm", MAP_SHAPES, "mask")[1]
    fm, valid, single = _maps(fm, valid)
    mask = mask & valid
    n, h, w, c = fm.shape
    x, m = fm.reshape(n, h * w, c), mask.reshape(n, h * w)
    return (x[0], m[0]) if single else (x, m)


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    """A ``(H, W)`` or ``(H, W, 3)`` float image in [0, 1] as 8-bit greyscale (OpenCV weights)."""
    img = np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def sift_cells(
    points: np.ndarray,
    image_shape: tuple[int, int],
    grid_shape: tuple[int, int],
    round_mode: str = "floor",
) -> np.ndarray:
    """Feature-grid cells ``(n, 2)`` as ``(row, col)`` of image points ``(n, 2)`` given as ``(x, y)``.

    ``round_mode='floor'`` (default): ``col = ⌊x·W/W_I⌋``, ``row = ⌊y·H/H_I⌋`` for 0-based pixel
    coordinates; ``'seed'``: the seed's 1-based ``round(x·W/W_I)`` (eq. 1) shifted to 0-based.
    Both are clamped to the grid (SPEC §14.1 #44).
    """
    if round_mode not in ("floor", "seed"):
        raise ValueError(f"round_mode: expected 'floor' or 'seed', got {round_mode!r}")
    (hi, wi), (h, w) = image_shape, grid_shape
    yx = np.asarray(points, np.float64).reshape(-1, 2)[:, ::-1]
    factor = np.array([h / hi, w / wi])
    if round_mode == "floor":
        cells = np.floor(yx * factor)
    else:
        cells = np.floor((yx + 1.0) * factor + 0.5) - 1.0
    return np.clip(cells.astype(np.int64), 0, np.array([h - 1, w - 1]))


def sift_mask(
    image: np.ndarray,
    grid_shape: tuple[int, int],
    radius: int = 0,
    round_mode: str = "floor",
    sift_params: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> np.ndarray:
    """SIFT-mask (seed 004 eq. 1): feature-grid cells holding an OpenCV SIFT keypoint.

    Keypoints come from ``cv2.SIFT_create(**sift_params)`` (OpenCV defaults; the seed used the
    VLFeat detector) on the 8-bit greyscale image; each keypoint ``(x, y)`` marks the cell
    :func:`sift_cells` gives it, and ``radius > 0`` also marks the ``(2r+1) × (2r+1)`` cells around
    it (``radius=1`` is the 3 × 3 neighbourhood of one reference code base). Host-side (OpenCV),
    not jit-able.

    Args:
      image: float image in [0, 1], ``(H_I, W_I, 3)`` / ``(H_I, W_I)``, or a batch
        ``(N, H_I, W_I, 3)`` of equal-size images.
      grid_shape: ``(H, W)`` of the feature map the mask is for.
      radius: neighbourhood radius in cells (default 0, as in the seed).
      round_mode: ``'floor'`` (default) or ``'seed'``, see :func:`sift_cells`.
      sift_params: keyword arguments of ``cv2.SIFT_create``.
      validate: reject NaN/inf in the image.

    Returns a boolean numpy mask ``(H, W)`` or ``(N, H, W)``.
    """
    image = np.asarray(image)
    check_ndim(image, "image", (2, 3, 4), "an image (H, W[, 3]) or a batch (N, H, W, 3)")
    check_floating(image, "image")
    if image.ndim == 4 or (image.ndim == 3 and image.shape[-1] != 3):
        return np.stack(
            [sift_mask(im, grid_shape, radius, round_mode, sift_params, validate) for im in image]
        )
    if validate:
        check_finite(image, "image")
    grid_shape = _grid(grid_shape)
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius: expected a non-negative integer, got {radius!r}")
    detector = cv2.SIFT_create(**dict(sift_params or {}))
    keypoints = detector.detect(_gray_uint8(image), None)
    mask = np.zeros(grid_shape, bool)
    if keypoints:
        pts = np.array([kp.pt for kp in keypoints])
        cells = sift_cells(pts, image.shape[:2], grid_shape, round_mode)
        mask[cells[:, 0], cells[:, 1]] = True
    if radius:
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0
    return mask


def _grid(grid_shape: Sequence[int]) -> tuple[int, int]:
    if len(grid_shape) != 2:
        raise ValueError(f"grid_shape: expected (H, W), got {grid_shape!r}")
    return check_positive_int(grid_shape[0], "grid_shape[0]"), check_positive_int(
        grid_shape[1], "grid_shape[1]"
    )
