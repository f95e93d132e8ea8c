"""Multi-scale global descriptor extraction with a :class:`jret.models.RetrievalNet`.

The test-time protocol of Radenović, Tolias & Chum, TPAMI 2018 ([000] L3181–3215) and of the
revisited benchmark ([000] L27956–27975; SPEC §1.4.4, §2.8):

1. Query images are cropped to their box first; nothing outside the box is used.
2. The image is shrunk (never enlarged) so its longer side is ``max_side`` (default 1024), with
   antialiasing; a query crop is shrunk by the factor of its *full* image.
3. At each scale s in ``scales`` (default ``(1, 1/√2, 1/2)``) the image is resized by s with bilinear
   interpolation and no antialiasing (torch ``interpolate`` semantics) and described by the network
   (pool → ℓ2 → [whitening → ℓ2]).
4. The per-scale vectors are combined by a power mean with the network's GeM p (p = 1, an average,
   for other poolings or when a whitening layer is inside the network) and ℓ2-normalised.

Images of equal size are batched; sizes are padded up to a multiple of ``pad_multiple`` pixels with
a validity mask so that few shapes are compiled (``pad_multiple=1`` runs every shape exactly).
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jret._checks import check_finite
from jret.data.revisited import crop_query, load_image
from jret.models.retrieval import RetrievalNet
from jret.normalize import l2n

DEFAULT_SCALES = (1.0, 2**-0.5, 0.5)
ImageLike = np.ndarray | str | os.PathLike


def unbind_model(params: Any, model: Any, expected: type[nn.Module] = RetrievalNet):
    """``(model, variables)`` from ``params`` given as variables with ``model=`` or as a bound
    module; ``expected`` is the module class the extractor needs (default RetrievalNet)."""
    if isinstance(params, nn.Module):
        if params.scope is None:
            raise ValueError(
                "params: a Module must be bound to its variables (model.bind(variables))"
            )
        model, variables = params.unbind()
    else:
        variables = params
    name = expected.__name__
    if model is None:
        raise ValueError(f"model: pass the {name} (or give params as model.bind(variables))")
    if not isinstance(model, expected):
        raise ValueError(f"model: expected a {name}, got {type(model).__name__}")
    return model, variables


def multiscale_power(model: RetrievalNet, variables: dict) -> jax.Array:
    """The exponent combining scales: the learned GeM p without in-network whitening, else 1."""
    if model.pooling == "gem" and model.whiten_dim is None:
        return jnp.asarray(variables["params"]["p"], jnp.float32)
    return jnp.float32(1.0)


def combine_scales(vectors: jax.Array, p: jax.Array | float = 1.0) -> jax.Array:
    """Generalised mean over scales, ``l2n((mean_s z_s^p)^{1/p})``, of ``(S, N, D)`` vectors.

    For ``p ≠ 1`` the per-scale vectors must be non-negative (GeM outputs are).
    """
    p = jnp.asarray(p, jnp.float32)
    powered = jnp.mean(jnp.maximum(vectors, 0.0) ** p, axis=0) ** (1.0 / p)
    return l2n(jnp.where(p == 1.0, jnp.mean(vectors, axis=0), powered))


def _shrink_factor(full_hw: tuple[int, int], max_side: int | None) -> float:
    if max_side is None:
        return 1.0
    return min(1.0, max_side / max(full_hw))


@functools.lru_cache(maxsize=1024)
def _bilinear_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """``(n_out, n_in)`` weights of bilinear resampling with half-pixel centres, rows summing to
    1; when shrinking with ``antialias`` the triangle kernel widens by the shrink factor. The
    weights of ``jax.image.resize(..., 'bilinear')``, computed on the host: one program per
    image size would otherwise be compiled."""
    scale = n_out / n_in
    support = max(1.0 / scale, 1.0) if antialias else 1.0
    centre = (np.arange(n_out) + 0.5) / scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(centre[:, None] - np.arange(n_in)[None, :]) / support)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 1000 * np.finfo(np.float32).eps, w / np.where(total > 0, total, 1), 0)
    inside = (centre >= -0.5) & (centre <= n_in - 0.5)
    return np.where(inside[:, None], w, 0.0).astype(np.float32)


def _resize(img: np.ndarray, hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """Bilinear resize of an ``(H, W, C)`` image to ``hw`` (separable, rows then columns)."""
    if tuple(img.shape[:2]) == tuple(hw):
        return img
    (H, W, C), (h, w) = img.shape, hw
    rows = _bilinear_weights(H, h, antialias) @ np.asarray(img, np.float32).reshape(H, W * C)
    return np.matmul(_bilinear_weights(W, w, antialias), rows.reshape(h, W, C))


def prepare_image(
    image: ImageLike,
    bbox: Sequence[float] | None = None,
    max_side: int | None = 1024,
    crop_mode: str = "python",
) -> np.ndarray:
    """Load (if a path), crop to ``bbox`` and shrink to ``max_side``: step 1–2 of the protocol.

    Returns a float32 ``(H, W, 3)`` image in [0, 1].
    """
    img = (
        load_image(image)
        if isinstance(image, (str, os.PathLike))
        else np.asarray(image, np.float32)
    )
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"images: expected (H, W, 3) RGB images, got shape {img.shape}")
    factor = _shrink_factor(img.shape[:2], max_side)
    if bbox is not None:
        img = crop_query(img, bbox, crop_mode)
    if factor < 1.0:
        hw = (max(1, round(img.shape[0] * factor)), max(1, round(img.shape[1] * factor)))
        img = _resize(img, hw, antialias=True)
    return img


def _scaled_shape(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, math.floor(hw[0] * scale)), max(1, math.floor(hw[1] * scale))


def _padded(hw: tuple[int, int], multiple: int) -> tuple[int, int]:
    return tuple(-(-v // multiple) * multiple for v in hw)


def _batch_size_for(n: int, batch_size: int) -> int:
    """Next power of two >= n, capped at ``batch_size``: few distinct batch shapes to compile."""
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def pad_value(model: Any) -> np.ndarray:
    """The value padded images are filled with: the network's input mean (zeros without one)."""
    return np.asarray(model.mean if model.mean is not None else (0.0, 0.0, 0.0), np.float32)


def check_extract_args(
    images: Sequence[ImageLike],
    bboxes: Sequence[Sequence[float] | None] | None,
    scales: Sequence[float],
    batch_size: int,
    pad_multiple: int,
    window: int,
) -> None:
    """Validate the arguments every extractor shares; raise ``ValueError`` naming the culprit."""
    if len(images) == 0:
        raise ValueError("images: expected at least one image")
    if bboxes is not None and len(bboxes) != len(images):
        raise ValueError(f"bboxes: expected one entry per image ({len(images)}), got {len(bboxes)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales: expected positive scales, got {tuple(scales)}")
    if min(pad_multiple, batch_size, window) < 1:
        raise ValueError(
            f"pad_multiple, batch_size, window: expected >= 1, got {pad_multiple}, {batch_size}, "
            f"{window}"
        )


def prepared_windows(
    images: Sequence[ImageLike],
    bboxes: Sequence[Sequence[float] | None] | None,
    max_side: int | None,
    crop_mode: str,
    window: int,
    validate: bool,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(first, prepared)`` per ``window`` images: each loaded, cropped to its box and shrunk by
    :func:`prepare_image` (and checked for NaN/inf if ``validate``), so that memory stays bounded
    on long image lists."""
    for first in range(0, len(images), window):
        prepared = []
        for i in range(first, min(first + window, len(images))):
            box = None if bboxes is None else bboxes[i]
            img = prepare_image(images[i], box, max_side, crop_mode)
            if validate:
                check_finite(img, f"images[{i}]")
            prepared.append(img)
        yield first, prepared


def extract_global(
    params: Any,
    images: Sequence[ImageLike],
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    model: RetrievalNet | None = None,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    max_side: int | None = 1024,
    crop_mode: str = "python",
    batch_size: int = 16,
    pad_multiple: int = 32,
    window: int = 512,
    progress: bool | None = None,
    validate: bool = True,
) -> np.ndarray:
    """Multi-scale global descriptors ``(N, D)`` of ``images`` (see the module docstring).

    Args:
      params: the network's variables with ``model=``, or a bound ``model.bind(variables)``.
      images: ``(H, W, 3)`` float images in [0, 1] or image file paths (loaded one batch at a time).
      scales: test-time scales relative to the shrunk image (default ``(1, 1/√2, 1/2)``).
      model: the :class:`RetrievalNet` when ``params`` are plain variables.
      bboxes: per-image query boxes ``(x1, y1, x2, y2)`` or None; cropped before anything else.
      max_side: longer side after shrinking (default 1024; None keeps the original size).
      crop_mode: ``'python'`` (default) or ``'matlab'`` box rounding (SPEC §14.1 #1).
      batch_size: images per forward pass.
      pad_multiple: sizes are padded up to a multiple of this (pad value = the input mean, masked
        out of pooling); 1 runs each size exactly.
      window: images loaded and prepared at a time, so memory stays bounded on long lists.
      progress: show a progress bar (default: when more than 64 images).
      validate: check the inputs and the outputs for NaN/inf.

    Returns float32 ℓ2-normalised descriptors ``(N, D)``.
    """
    model, variables = unbind_model(params, model)
    forward = jax.jit(lambda v, x, m: model.apply(v, x, mask=m))
    power = multiscale_power(model, variables)
    return describe_images(
        forward,
        variables,
        images,
        scales,
        lambda per_scale: combine_scales(per_scale, power),
        bboxes=bboxes,
        max_side=max_side,
        crop_mode=crop_mode,
        batch_size=batch_size,
        pad_multiple=pad_multiple,
        window=window,
        pad=pad_value(model),
        progress=progress,
        validate=validate,
    )


def describe_images(
    forward: Callable[[Any, np.ndarray, np.ndarray], jax.Array],
    variables: Any,
    images: Sequence[ImageLike],
    scales: Sequence[float],
    combine: Callable[[jax.Array], jax.Array],
    *,
    bboxes: Sequence[Sequence[float] | None] | None,
    max_side: int | None,
    crop_mode: str,
    batch_size: int,
    pad_multiple: int,
    window: int,
    pad: np.ndarray,
    progress: bool | None,
    validate: bool,
) -> np.ndarray:
    """The loop every global extractor shares: per window of prepared images and per scale,
    ``forward(variables, images (B, H, W, 3), mask (B, H, W)) -> (B, D)`` batched by padded
    size, then ``combine((S, n, D)) -> (n, D)`` over the scales. Returns ``(N, D)`` float32."""
    check_extract_args(images, bboxes, scales, batch_size, pad_multiple, window)
    result = None
    bar = tqdm(total=len(images), desc="extract", disable=not show_progress(progress, len(images)))
    for first, prepared in prepared_windows(images, bboxes, max_side, crop_mode, window, validate):
        per_scale = [
            _describe(forward, variables, prepared, s, batch_size, pad_multiple, pad)
            for s in scales
        ]
        desc = np.asarray(combine(jnp.asarray(np.stack(per_scale))))
        if result is None:
            result = np.zeros((len(images), desc.shape[1]), np.float32)
        result[first : first + len(prepared)] = desc
        bar.update(len(prepared))
    bar.close()
    if validate:
        check_finite(result, "descriptors")
    return result


def padded_batches(
    prepared: Sequence[np.ndarray],
    scale: float,
    batch_size: int,
    pad_multiple: int,
    pad_value: np.ndarray,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[tuple[int, int]]]]:
    """Prepared images resized by ``scale`` and batched by padded size: per batch ``(indices,
    images (B, H, W, 3), mask (B, H, W), sizes)``, the images padded with ``pad_value`` to a
    multiple of ``pad_multiple`` pixels and ``B`` rounded up (:func:`_batch_size_for`) so that few
    batch shapes are compiled; rows past ``len(indices)`` are padding."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(prepared):
        groups[_padded(_scaled_shape(img.shape[:2], scale), pad_multiple)].append(i)
    for shape, idx in groups.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            bs = _batch_size_for(len(chunk), batch_size)
            batch = np.broadcast_to(pad_value, (bs, *shape, 3)).copy()
            mask = np.zeros((bs, *shape), bool)
            sizes = [_scaled_shape(prepared[i].shape[:2], scale) for i in chunk]
            for j, (i, (h, w)) in enumerate(zip(chunk, sizes, strict=True)):
                batch[j, :h, :w] = _resize(prepared[i], (h, w), antialias=False)
                mask[j, :h, :w] = True
            yield chunk, batch, mask, sizes


def _describe(forward, variables, prepared, scale, batch_size, pad_multiple, pad_value):
    """Single-scale network descriptors ``(n, D)`` of prepared images, batched by padded size."""
    out = None
    for chunk, batch, mask, _ in padded_batches(
        prepared, scale, batch_size, pad_multiple, pad_value
    ):
        desc = np.asarray(forward(variables, batch, mask))[: len(chunk)]
        if out is None:
            out = np.zeros((len(prepared), desc.shape[1]), np.float32)
        out[chunk] = desc
    return out


def show_progress(progress: bool | None, n: int) -> bool:
    """Whether to draw a progress bar over ``n`` images: ``progress``, or more than 64 if None."""
    return n > 64 if progress is None else progress
