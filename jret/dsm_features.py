"""Local features detected on CNN activation maps, the channel acting as the visual word (DSM).

Siméoni, Avrithis & Chum, "Local features and visual words emerge in activations", CVPR 2019
([001] L101–125, L186–188; SPEC §5.3). A feature of channel ``j`` is an ellipse ``(µ, Σ)`` fitted
to a region of the map ``A^(j)`` by its first and second moments, with strength ``v`` = the
maximum activation inside the region; it has no descriptor, its channel is its visual word.

Two detectors:

* ``'mser'`` (the paper's): maximally stable extremal regions of high activation, one channel at
  a time, with OpenCV's MSER on the host (a sequential component-tree algorithm). Activations are
  cast to uint8 by truncation (``quantize_mode='clip'``, the reference code; ``'max'`` first scales
  the tensor so that its maximum is 255, for networks whose activations are far below 255); the step
  Δ is the value at 60 % of the distribution of the non-zero (scaled) activations of the tensor,
  rounded and clipped to [1, 12] (the reference rule; the paper takes it "over the dataset").
  Area limits are relative to the map (0.001 and 0.75 of ``H·W``). OpenCV's ``min_diversity``
  is not VLFeat's (0.7 in the paper removes nearly every region of an activation map), so jret
  keeps OpenCV's default 0.2 [JRET]. Ellipses come from the moments of the region's cells; a
  singular one (a single cell, a straight line of cells) is dropped, as in the reference code,
  unless ``pixel_area=True`` counts each cell as a unit square (``Σ + I/12``).
* ``'maxima'`` (the paper's Fig. 1(d) variant): cells larger than ``threshold`` and than or equal
  to their 8 neighbours, on device (``jit``/``vmap``). The ellipse is fitted to the half-maximum
  region of the peak: the moments of the cells of the ``(2r+1)²`` window (``radius=r``, 2 by
  default) with an activation of at least half the peak's and 8-connected to the peak through
  such cells (an extremal region at half the peak's level), each cell a unit square [JRET].

Optionally (``channel_norm``, [JRET]) every channel is first divided by its maximum or mean over
the image's maps, so that strengths are relative (:func:`normalize_channels`). Then, per scale
and per image (the reference code's order, SPEC §5.3):

1. bursty channels: with ``burst_rule='reference'`` channels with more than 36 detections are
   dropped and at most 20 (query) / 10 (database) features per channel are kept by strength; with
   ``'seed'`` channels with more than 20 (query) / 10 (database) detections are dropped;
2. database images only: greedy non-maximum suppression over all channels, IoU 0.2, on the
   axis-aligned boxes of the ellipses ``(x − µ)ᵀ Σ⁻¹ (x − µ) ≤ k²`` by strength; ``k = box_scale``
   is 1 by default (VLFeat's frame ellipse; 2 is the ellipse with the region's own extent)
   [UNSPEC → JRET];
3. the strongest ``max_features`` (2048 for ResNet, 512 for VGG) over all scales.

Coordinates are ``(x, y)`` = (column, row) in cells of the map of the feature's own scale; the
features of different scales stay apart for matching (:mod:`jret.spatial`).

From images: :func:`activation_maps` runs the backbone of a :class:`~jret.models.RetrievalNet`
at every scale (the protocol of :func:`jret.extract.prepare_image`: query crop, shrink to
``max_side``, scales ``(1, 1/√2, 1/2)``) and :func:`extract_features` detects on the maps;
:func:`dsm_network` gives the paper's ResNet↑ (last stage dilated) or an earlier cut of a ResNet.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import cv2
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jret._checks import check_finite, check_floating, check_ndim, check_positive_int
from jret.extract import (
    DEFAULT_SCALES,
    ImageLike,
    check_extract_args,
    pad_value,
    padded_batches,
    prepared_windows,
    show_progress,
)
from jret.models.retrieval import RetrievalNet, build_backbone

METHODS = ("mser", "maxima")
BURST_RULES = ("reference", "seed")
# (per-channel cap, burst limit) of the reference code and of the paper's text, SPEC §5.3 step 6.
_CAPS = {
    ("reference", False): (20, 36),
    ("reference", True): (10, 36),
    ("seed", False): (20, 20),
    ("seed", True): (10, 10),
}
_SINGULAR = 1e-6


@flax.struct.dataclass
class LocalFeatures:
    """A padded set of DSM features ``(..., M)``: one row per feature, ``mask`` marks real ones.

    Attributes:
      channel: ``(..., M)`` int32 channel (visual word) of each feature.
      mu: ``(..., M, 2)`` float32 centre ``(x, y)`` in cells of its scale's activation map.
      sigma: ``(..., M, 2, 2)`` float32 covariance of the region, in ``(x, y)`` order.
      strength: ``(..., M)`` float32 maximum activation in the region.
      scale: ``(..., M)`` int32 index of the scale the feature was detected at.
      mask: ``(..., M)`` bool, False on padding.
    """

    channel: jax.Array
    mu: jax.Array
    sigma: jax.Array
    strength: jax.Array
    scale: jax.Array
    mask: jax.Array


def empty_features(m: int) -> LocalFeatures:
    """An all-padding :class:`LocalFeatures` ``(m,)`` of numpy arrays (identity ellipses)."""
    shape = (m,)
    eye = np.broadcast_to(np.eye(2, dtype=np.float32), (*shape, 2, 2))
    return LocalFeatures(
        channel=np.zeros(shape, np.int32),
        mu=np.zeros((*shape, 2), np.float32),
        sigma=eye.copy(),
        strength=np.zeros(shape, np.float32),
        scale=np.zeros(shape, np.int32),
        mask=np.zeros(shape, bool),
    )


def stack_features(features: Sequence[LocalFeatures]) -> LocalFeatures:
    """Stack per-image sets of equal size ``M`` into one ``(N, M)`` set (numpy arrays)."""
    if not features:
        raise ValueError("features: expected at least one LocalFeatures")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *features)


# ----------------------------------------------------------------------------------------------
# Selection shared by both detectors: caps per channel, NMS, top-N.


def channel_caps(
    channel: jax.Array,
    strength: jax.Array,
    mask: jax.Array,
    num_channels: int,
    max_per_channel: int,
    burst_max: int,
) -> jax.Array:
    """Keep-mask ``(P,)`` of the per-channel rules on a padded candidate set ``(P,)``.

    Channels with more than ``burst_max`` candidates are dropped; in the others the
    ``max_per_channel`` strongest candidates are kept (ties: the earlier index).
    """
    channel, strength, mask = jnp.asarray(channel), jnp.asarray(strength), jnp.asarray(mask)
    counts = jax.ops.segment_sum(mask.astype(jnp.int32), channel, num_segments=num_channels)
    key = jnp.where(mask, channel, num_channels)
    order = jnp.lexsort((-strength, key))
    sorted_key = key[order]
    first = jnp.searchsorted(sorted_key, sorted_key, side="left")
    rank = jnp.zeros_like(channel).at[order].set(jnp.arange(channel.shape[0]) - first)
    return mask & (counts[channel] <= burst_max) & (rank < max_per_channel)


def ellipse_boxes(mu: jax.Array, sigma: jax.Array, k: float = 1.0) -> jax.Array:
    """Axis-aligned boxes ``(..., 4)`` = ``(x0, y0, x1, y1)`` of the ``k``σ ellipses."""
    half = k * jnp.sqrt(jnp.maximum(jnp.diagonal(sigma, axis1=-2, axis2=-1), 0.0))
    return jnp.concatenate([mu - half, mu + half], axis=-1)


def box_iou(box: jax.Array, boxes: jax.Array) -> jax.Array:
    """IoU ``(P,)`` of one box ``(4,)`` with boxes ``(P, 4)``; 0 where the union is empty."""
    w = jnp.maximum(jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]), 0.0)
    h = jnp.maximum(jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]), 0.0)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: jax.Array,
    strength: jax.Array,
    mask: jax.Array,
    iou_threshold: float = 0.2,
    max_keep: int | None = None,
) -> jax.Array:
    """Greedy non-maximum suppression; returns the keep-mask ``(P,)`` of boxes ``(P, 4)``.

    Boxes are visited by decreasing strength (ties: the earlier index); a box is kept unless a
    kept box overlaps it with IoU > ``iou_threshold``. With ``max_keep`` the visit stops once that
    many are kept (the later ones are not kept), which is what a top-``max_keep`` after NMS needs.
    """
    boxes, strength, mask = jnp.asarray(boxes), jnp.asarray(strength), jnp.asarray(mask)
    p = boxes.shape[0]
    limit = p if max_keep is None else max_keep
    order = jnp.argsort(-jnp.where(mask, strength, -jnp.inf), stable=True)
    sboxes = boxes[order]
    alive0 = mask[order]

    def cond(state):
        i, _, kept = state
        return (i < p) & (kept < limit)

    def body(state):
        i, alive, kept = state
        keep_i = alive[i]
        overlap = (box_iou(sboxes[i], sboxes) > iou_threshold) & (jnp.arange(p) > i)
        alive = jnp.where(keep_i, alive & ~overlap, alive)
        return i + 1, alive, kept + keep_i.astype(jnp.int32)

    stop, alive, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), alive0, jnp.int32(0)))
    keep_sorted = alive & (jnp.arange(p) < stop)
    return jnp.zeros(p, bool).at[order].set(keep_sorted)


def _top(features: LocalFeatures, keep: jax.Array, m: int) -> LocalFeatures:
    """The ``m`` strongest kept features ``(m,)``, by decreasing strength, padded."""
    score = jnp.where(keep, features.strength, -jnp.inf)
    if score.shape[0] < m:
        pad = m - score.shape[0]
        features = jax.tree.map(
            lambda x: jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]), features
        )
        score = jnp.concatenate([score, jnp.full((pad,), -jnp.inf)])
    _, idx = jax.lax.top_k(score, m)
    out = jax.tree.map(lambda x: x[idx], features)
    valid = jnp.isfinite(score[idx])
    eye = jnp.broadcast_to(jnp.eye(2, dtype=out.sigma.dtype), out.sigma.shape)
    return out.replace(mask=valid, sigma=jnp.where(valid[:, None, None], out.sigma, eye))


@partial(
    jax.jit,
    static_argnames=("m", "num_channels", "max_per_channel", "burst_max", "nms_iou", "box_scale"),
)
def _select(
    features: LocalFeatures,
    m: int,
    num_channels: int,
    max_per_channel: int,
    burst_max: int,
    nms_iou: float | None,
    box_scale: float,
) -> LocalFeatures:
    """Per-channel caps, optional NMS and top-``m`` of one scale's candidate set ``(P,)``."""
    keep = channel_caps(
        features.channel,
        features.strength,
        features.mask,
        num_channels,
        max_per_channel,
        burst_max,
    )
    if nms_iou is not None:
        boxes = ellipse_boxes(features.mu, features.sigma, box_scale)
        keep = nms(boxes, features.strength, keep, nms_iou, max_keep=m)
    return _top(features, keep, m)


@partial(jax.jit, static_argnames="m")
def _merge_scales(per_scale: Sequence[LocalFeatures], m: int) -> LocalFeatures:
    """The ``m`` strongest features over the scales (each set carries its scale index)."""
    cat = jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_scale)
    return _top(cat, cat.mask, m)


# ----------------------------------------------------------------------------------------------
# Local maxima (on device).


def local_maxima(a: jax.Array, threshold: float = 0.0) -> jax.Array:
    """Bool ``(H, W, C)``: cells ``> threshold`` and ``>=`` their 8 neighbours, per channel."""
    h, w, _ = a.shape
    padded = jnp.pad(a, ((1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    peak = a > threshold
    for dy, dx in itertools.product(range(3), repeat=2):
        if (dy, dx) != (1, 1):
            peak = peak & (a >= padded[dy : dy + h, dx : dx + w])
    return peak


def _connected(above: jax.Array, radius: int) -> jax.Array:
    """Cells of windows ``(P, k, k)`` 8-connected to the centre through ``above`` cells."""
    k = 2 * radius + 1
    reach = jnp.zeros_like(above).at[:, radius, radius].set(True)

    def grow(_, reach):
        padded = jnp.pad(reach, ((0, 0), (1, 1), (1, 1)))
        near = jnp.zeros_like(reach)
        for dy in range(3):
            for dx in range(3):
                near = near | padded[:, dy : dy + k, dx : dx + k]
        return near & above

    return jax.lax.fori_loop(0, k * k - 1, grow, reach)


def peak_ellipses(
    a: jax.Array, ys: jax.Array, xs: jax.Array, cs: jax.Array, radius: int = 2
) -> tuple[jax.Array, jax.Array]:
    """Centres ``(P, 2)`` and covariances ``(P, 2, 2)`` of peaks at ``(ys, xs)`` of channels ``cs``.

    Moments of the half-maximum region of each peak inside its ``(2r+1)²`` window: the cells of
    at least half the peak value, 8-connected to the peak through such cells, each a unit square
    (``+ I/12``); cells outside the map weigh 0. ``a`` is one map ``(H, W, C)``.
    """
    h, w, _ = a.shape
    k = 2 * radius + 1
    offsets = jnp.arange(-radius, radius + 1)
    dy, dx = jnp.meshgrid(offsets, offsets, indexing="ij")
    yy, xx = ys[:, None, None] + dy, xs[:, None, None] + dx
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    vals = a[jnp.clip(yy, 0, h - 1), jnp.clip(xx, 0, w - 1), cs[:, None, None]]
    peak = a[ys, xs, cs]
    region = _connected(inside & (vals >= 0.5 * peak[:, None, None]), radius)
    weight = region.reshape(-1, k * k).astype(a.dtype)
    d = jnp.stack([dx.ravel(), dy.ravel()], axis=-1).astype(a.dtype)
    total = weight.sum(1, keepdims=True)
    mean = weight @ d / total
    second = jnp.einsum("pk,ki,kj->pij", weight, d, d) / total[:, :, None]
    sigma = second - mean[:, :, None] * mean[:, None, :] + jnp.eye(2, dtype=a.dtype) / 12.0
    mu = jnp.stack([xs, ys], axis=-1).astype(a.dtype) + mean
    return mu, sigma


@partial(
    jax.jit,
    static_argnames=(
        "m",
        "max_per_channel",
        "burst_max",
        "nms_iou",
        "box_scale",
        "pool",
        "radius",
        "scale_index",
    ),
)
def _maxima_scale(
    a: jax.Array,
    threshold: float,
    m: int,
    max_per_channel: int,
    burst_max: int,
    nms_iou: float | None,
    box_scale: float,
    pool: int,
    radius: int,
    scale_index: int,
) -> LocalFeatures:
    """Local-maxima features ``(m,)`` of one map ``(H, W, C)`` (caps, NMS and top-m applied)."""
    h, w, c = a.shape
    peaks = local_maxima(a, threshold)
    counts = peaks.sum((0, 1))
    score = jnp.where(peaks, a, -jnp.inf).reshape(h * w, c).T
    k = min(max_per_channel, h * w)
    top_score, top_pos = jax.lax.top_k(score, k)
    ok = jnp.isfinite(top_score) & (counts <= burst_max)[:, None]
    flat_score = jnp.where(ok, top_score, -jnp.inf).ravel()
    n = min(pool if nms_iou is not None else m, flat_score.shape[0])
    cand_score, cand = jax.lax.top_k(flat_score, n)
    cs = (cand // k).astype(jnp.int32)
    pos = top_pos.ravel()[cand]
    ys, xs = pos // w, pos % w
    mu, sigma = peak_ellipses(a, ys, xs, cs, radius)
    valid = jnp.isfinite(cand_score)
    feats = LocalFeatures(
        channel=cs,
        mu=mu,
        sigma=sigma,
        strength=jnp.where(valid, cand_score, 0.0),
        scale=jnp.full((n,), scale_index, jnp.int32),
        mask=valid,
    )
    keep = valid
    if nms_iou is not None:
        keep = nms(ellipse_boxes(mu, sigma, box_scale), feats.strength, valid, nms_iou, max_keep=m)
    return _top(feats, keep, m)


# ----------------------------------------------------------------------------------------------
# MSER (host, OpenCV).


def quantize(a: np.ndarray, mode: str = "clip") -> np.ndarray:
    """uint8 activations for MSER: ``'clip'`` truncates and clips to 0..255 (reference code),
    ``'max'`` first scales the tensor so its maximum is 255."""
    a = np.asarray(a, np.float32)
    if mode == "max":
        top = float(a.max()) if a.size else 0.0
        a = a * (255.0 / top) if top > 0 else a
    elif mode != "clip":
        raise ValueError(f"quantize: expected 'clip' or 'max', got {mode!r}")
    return np.clip(np.floor(a), 0, 255).astype(np.uint8)


def mser_delta(q: np.ndarray, fraction: float = 0.6, cap: int = 12) -> int:
    """Step Δ: the value at ``fraction`` of the non-zero quantised activations, in [1, ``cap``]."""
    nz = q[q > 0]
    if nz.size == 0:
        return 1
    return int(np.clip(np.round(np.quantile(nz.astype(np.float64), fraction)), 1, cap))


def mser_regions(
    a: np.ndarray,
    *,
    quantize_mode: str = "clip",
    delta: int | None = None,
    min_area: float = 0.001,
    max_area: float = 0.75,
    max_variation: float = 0.5,
    min_diversity: float = 0.2,
    pixel_area: bool = False,
) -> dict[str, np.ndarray]:
    """MSER of high activation in every channel of one map ``(H, W, C)`` (host, OpenCV).

    Returns numpy arrays over the ``P`` regions: ``channel (P,)``, ``mu (P, 2)``, ``sigma
    (P, 2, 2)`` (``(x, y)`` order) and ``strength (P,)`` (the maximum float activation over the
    region); regions with a singular ellipse are dropped unless ``pixel_area``.
    """
    h, w, c = a.shape
    q = quantize(a, quantize_mode)
    step = mser_delta(q) if delta is None else delta
    detector = cv2.MSER_create(
        step,
        max(1, int(np.ceil(min_area * h * w))),
        max(1, int(max_area * h * w)),
        max_variation,
        min_diversity,
    )
    detector.setPass2Only(True)
    points, owner = [], []
    for j in range(c):
        regions, _ = detector.detectRegions(np.ascontiguousarray(q[:, :, j]))
        points.extend(regions)
        owner.extend([j] * len(regions))
    return region_features(points, owner, a, pixel_area)


def region_features(
    points: Sequence[np.ndarray], channels: Sequence[int], a: np.ndarray, pixel_area: bool = False
) -> dict[str, np.ndarray]:
    """Ellipses and strengths of regions given as cell lists ``(P_i, 2)`` in ``(x, y)`` order.

    ``mu`` and ``sigma`` are the mean and the (biased) covariance of the cells, plus ``I/12``
    with ``pixel_area``; ``strength`` is the maximum of ``a[y, x, channel]`` over the region.
    Regions with a singular ellipse (``det Σ ≤ 1e-6``) are dropped.
    """
    if not len(points):
        return {
            "channel": np.zeros(0, np.int32),
            "mu": np.zeros((0, 2), np.float32),
            "sigma": np.zeros((0, 2, 2), np.float32),
            "strength": np.zeros(0, np.float32),
        }
    sizes = np.array([len(p) for p in points])
    xy = np.concatenate(points).astype(np.float64)
    channel = np.asarray(channels, np.int32)
    rid = np.repeat(np.arange(len(points)), sizes)
    mu = np.stack([np.bincount(rid, xy[:, k]) for k in range(2)], 1) / sizes[:, None]
    d = xy - mu[rid]
    cov = (
        np.stack([np.bincount(rid, d[:, i] * d[:, j]) for i, j in ((0, 0), (0, 1), (1, 1))], 1)
        / sizes[:, None]
    )
    sigma = np.stack([cov[:, [0, 1]], cov[:, [1, 2]]], axis=1)
    if pixel_area:
        sigma = sigma + np.eye(2) / 12.0
    values = np.asarray(a, np.float32)[xy[:, 1].astype(int), xy[:, 0].astype(int), channel[rid]]
    strength = np.maximum.reduceat(values, np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    ok = np.linalg.det(sigma) > _SINGULAR
    return {
        "channel": channel[ok],
        "mu": mu[ok].astype(np.float32),
        "sigma": sigma[ok].astype(np.float32),
        "strength": strength[ok].astype(np.float32),
    }


def _padded_candidates(regions: dict[str, np.ndarray], scale_index: int) -> LocalFeatures:
    """Host candidates padded to a power of two (few compiled shapes)."""
    p = len(regions["channel"])
    size = 1 << max(4, (p - 1).bit_length())
    out = empty_features(size)
    out.channel[:p] = regions["channel"]
    out.mu[:p] = regions["mu"]
    out.sigma[:p] = regions["sigma"]
    out.strength[:p] = regions["strength"]
    out.scale[:] = scale_index
    out.mask[:p] = True
    return out


# ----------------------------------------------------------------------------------------------
# Entry point.


def _pad_cells(a, multiple: int) -> jax.Array:
    """Zero-pad the two spatial axes of ``(..., H, W, C)`` up to a multiple of ``multiple``."""
    h, w = np.shape(a)[-3:-1]
    pad = [(0, 0)] * (np.ndim(a) - 3) + [(0, -h % multiple), (0, -w % multiple), (0, 0)]
    return jnp.pad(jnp.asarray(a), pad)


def _as_scales(feature_map) -> list:
    maps = list(feature_map) if isinstance(feature_map, (list, tuple)) else [feature_map]
    if not maps:
        raise ValueError("feature_map: expected at least one map")
    for s, a in enumerate(maps):
        check_ndim(a, f"feature_map[{s}]", (3, 4), "a map (H, W, C) or maps (N, H, W, C)")
        check_floating(a, f"feature_map[{s}]")
    ndims = {np.ndim(a) for a in maps}
    channels = {np.shape(a)[-1] for a in maps}
    if len(ndims) > 1 or len(channels) > 1:
        raise ValueError(
            "feature_map: every scale must have the same rank and number of channels, got "
            f"shapes {[np.shape(a) for a in maps]}"
        )
    if ndims == {4} and len({np.shape(a)[0] for a in maps}) > 1:
        raise ValueError(f"feature_map: batch sizes differ, {[np.shape(a) for a in maps]}")
    return maps


CHANNEL_NORMS = ("max", "mean")


def normalize_channels(maps: Sequence, mode: str = "mean") -> list[jax.Array]:
    """Divide every channel of one image's maps ``(…, H_s, W_s, C)`` (one per scale) by its
    ``'max'`` or ``'mean'`` activation over all of them; an all-zero channel stays zero.

    The channels of a random-initialised network differ in scale by orders of magnitude, so the
    strongest features of raw maps come from a few channels; relative strengths spread them over
    the channels (with ``'mean'``, a peak's strength is its contrast to its channel) [JRET].
    """
    if mode not in CHANNEL_NORMS:
        raise ValueError(f"channel_norm: expected one of {CHANNEL_NORMS} or None, got {mode!r}")
    maps = [jnp.asarray(a) for a in maps]
    if mode == "max":
        stat = jnp.max(jnp.stack([a.max((-3, -2)) for a in maps]), axis=0)
    else:
        cells = sum(a.shape[-3] * a.shape[-2] for a in maps)
        stat = sum(a.sum((-3, -2)) for a in maps) / cells
    scale = jnp.where(stat > 0, 1.0 / jnp.where(stat > 0, stat, 1.0), 0.0)
    return [a * scale[..., None, None, :] for a in maps]


def detect(
    feature_map,
    method: str = "mser",
    *,
    database: bool = False,
    max_features: int = 2048,
    burst_rule: str = "reference",
    nms_iou: float | None = 0.2,
    box_scale: float = 1.0,
    nms_pool: int = 4096,
    threshold: float = 0.0,
    radius: int = 2,
    pad_cells: int = 8,
    quantize_mode: str = "clip",
    delta: int | None = None,
    min_diversity: float = 0.2,
    pixel_area: bool = False,
    channel_norm: str | None = None,
    validate: bool = True,
) -> LocalFeatures:
    """DSM local features of one image's activation maps over scales (see the module docstring).

    Args:
      feature_map: post-ReLU activations ``(H, W, C)`` of one image at one scale, a batch of
        equal-size maps ``(N, H, W, C)``, or a sequence of either, one per scale (paper: scales
        1, 1/√2, 1/2). Padded cells must be cropped (``'mser'``) or set to 0 (``'maxima'``).
      method: ``'mser'`` (host, OpenCV; the paper) or ``'maxima'`` (device).
      database: database image (caps 10 per channel, NMS) rather than query (20, no NMS).
      max_features: features kept over all scales by strength (2048 ResNet, 512 VGG).
      burst_rule: ``'reference'`` (drop channels > 36, keep ≤ 20/10) or ``'seed'`` (drop > 20/10).
      nms_iou: IoU of the database-side NMS (0.2); None disables it.
      box_scale: NMS boxes bound the ellipses at ``box_scale`` σ (1).
      nms_pool: ``'maxima'`` only: NMS runs over the ``nms_pool`` strongest candidates of a scale
        (exact whenever ``max_features`` of them survive).
      threshold, radius: ``'maxima'`` only: minimum peak value (0, must be >= 0) and window
        radius of the ellipse fit (2).
      pad_cells: ``'maxima'`` only: maps are zero-padded at the bottom/right to a multiple of this
        many cells so that few shapes are compiled; a zero cell is never a peak and never weighs
        in an ellipse, so the features do not change.
      quantize_mode, delta, min_diversity, pixel_area: ``'mser'`` only: uint8 cast (``'clip'`` /
        ``'max'``), step Δ (None: the 60 % rule), OpenCV's diversity (0.2), unit-square cells.
      channel_norm: None (the paper), or ``'max'`` / ``'mean'``: every channel is divided first
        by its maximum / mean activation over the image's maps (:func:`normalize_channels`).
      validate: check the maps for NaN/inf.

    Returns:
      :class:`LocalFeatures` ``(max_features,)`` or ``(N, max_features)``, by decreasing strength.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if burst_rule not in BURST_RULES:
        raise ValueError(f"burst_rule: expected one of {BURST_RULES}, got {burst_rule!r}")
    if nms_iou is not None and not 0.0 <= nms_iou < 1.0:
        raise ValueError(f"nms_iou: expected a value in [0, 1) or None, got {nms_iou!r}")
    if not box_scale > 0:
        raise ValueError(f"box_scale: expected a positive number of σ, got {box_scale!r}")
    m = check_positive_int(max_features, "max_features")
    check_positive_int(nms_pool, "nms_pool")
    check_positive_int(pad_cells, "pad_cells")
    if not threshold >= 0:
        raise ValueError(f"threshold: expected a non-negative peak threshold, got {threshold!r}")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius: expected a non-negative integer, got {radius!r}")
    maps = _as_scales(feature_map)
    if validate:
        for s, a in enumerate(maps):
            check_finite(a, f"feature_map[{s}]")
    if channel_norm is not None:
        maps = normalize_channels(maps, channel_norm)
    per_channel, burst_max = _CAPS[(burst_rule, database)]
    iou = nms_iou if database else None
    if method == "maxima":

        def one(a, s):
            return _maxima_scale(
                a,
                threshold,
                m,
                per_channel,
                burst_max,
                iou,
                float(box_scale),
                nms_pool,
                int(radius),
                s,
            )

        batched = np.ndim(maps[0]) == 4
        per_scale = [
            (jax.vmap(one, in_axes=(0, None)) if batched else one)(_pad_cells(a, pad_cells), s)
            for s, a in enumerate(maps)
        ]
        if batched:
            return jax.vmap(lambda sets: _merge_scales(sets, m))(per_scale)
        return _merge_scales(per_scale, m)

    def mser_image(image_maps) -> LocalFeatures:
        sets = []
        for s, a in enumerate(image_maps):
            regions = mser_regions(
                np.asarray(a),
                quantize_mode=quantize_mode,
                delta=delta,
                min_diversity=min_diversity,
                pixel_area=pixel_area,
            )
            candidates = _padded_candidates(regions, s)
            sets.append(
                _select(candidates, m, a.shape[-1], per_channel, burst_max, iou, float(box_scale))
            )
        return jax.tree.map(np.asarray, _merge_scales(sets, m))

    if np.ndim(maps[0]) == 4:
        return stack_features([mser_image([a[i] for a in maps]) for i in range(len(maps[0]))])
    return mser_image(maps)


# ----------------------------------------------------------------------------------------------
# From images.


def dsm_network(
    model: RetrievalNet, *, dilate: bool = False, num_stages: int | None = None
) -> RetrievalNet:
    """The network whose activations DSM detects on, with the parameters of ``model``.

    ``dilate`` gives a ResNet↑ (the last kept stage dilated: stride 16 instead of 32, [001]
    L153); ``num_stages`` < 4 cuts a ResNet after an earlier stage (e.g. 2: conv3_x, stride 8).
    """
    kwargs = dict(model.backbone_kwargs or {})
    if dilate:
        kwargs["dilate_last_stage"] = True
    if num_stages is not None:
        kwargs["num_stages"] = num_stages
    return model.clone(backbone_kwargs=kwargs) if kwargs else model


def _valid_cells(size: int, stride: int, anchor: str) -> int:
    """Cells of a map that read pixels of an image side of ``size`` (as ``feature_mask``)."""
    return max(1, -(-size // stride) if anchor == "first" else size // stride)


def _scale_maps(forward, prepared, scale: float, opts: dict) -> list[np.ndarray]:
    """Activations ``(h_i, w_i, C)`` of prepared images at one scale, padded cells cropped."""
    out: list = [None] * len(prepared)
    batches = padded_batches(prepared, scale, opts["batch_size"], opts["pad_multiple"], opts["pad"])
    for chunk, batch, _, sizes in batches:
        maps = np.asarray(forward(batch))
        for j, (i, (h, w)) in enumerate(zip(chunk, sizes, strict=True)):
            cells = (_valid_cells(v, opts["stride"], opts["anchor"]) for v in (h, w))
            out[i] = maps[j, : next(cells), : next(cells)]
    return out


def activation_maps(
    model: RetrievalNet,
    variables: Mapping[str, Any],
    images: Sequence[ImageLike],
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    max_side: int | None = 1024,
    crop_mode: str = "python",
    batch_size: int = 8,
    pad_multiple: int = 32,
    window: int = 256,
    validate: bool = True,
) -> Iterator[tuple[int, list[list[np.ndarray]]]]:
    """Backbone activations of images at every scale, a window of images at a time.

    Each image is loaded, cropped to its box and shrunk to ``max_side`` as in
    :func:`jret.extract.prepare_image` (DSM: scales 1, 1/√2, 1/2 of a 1024-pixel image, [001]
    L151–155), resized by each scale and run through ``model``'s backbone; images of equal padded
    size (a multiple of ``pad_multiple`` pixels, padded with the input mean) share a batch.

    Yields ``(first, maps)`` per window of ``window`` images: ``maps[i][s]`` is the post-ReLU map
    ``(h, w, C)`` of image ``first + i`` at scale ``s``, cropped to the cells of the image.
    """
    check_extract_args(images, bboxes, scales, batch_size, pad_multiple, window)
    backbone = build_backbone(model.backbone, **dict(model.backbone_kwargs or {}))
    opts = {
        "batch_size": batch_size,
        "pad_multiple": pad_multiple,
        "pad": pad_value(model),
        "stride": backbone.stride,
        "anchor": backbone.mask_anchor,
    }
    apply = jax.jit(lambda v, x: model.apply(v, x, method=RetrievalNet.backbone_features))
    forward = partial(apply, variables)
    for first, prepared in prepared_windows(images, bboxes, max_side, crop_mode, window, validate):
        per_scale = [_scale_maps(forward, prepared, s, opts) for s in scales]
        yield first, [list(maps) for maps in zip(*per_scale, strict=True)]


def _detect_many(
    maps: list[list[np.ndarray]], method: str, pad_cells: int, batch: int, **kwargs
) -> list[LocalFeatures]:
    """Detect on many images. ``'maxima'`` pads every map to the largest of its scale (a
    multiple of ``pad_cells``; zero cells change nothing) and runs ``batch`` images at a time,
    the last batch padded: one compiled program per window of images."""
    if kwargs.get("channel_norm") is not None:
        maps = [normalize_channels(m, kwargs["channel_norm"]) for m in maps]
        kwargs["channel_norm"] = None
    if method != "maxima":
        return [jax.tree.map(np.asarray, detect(m, method, **kwargs)) for m in maps]
    shapes = [
        tuple(-(-max(np.shape(m[s])[k] for m in maps) // pad_cells) * pad_cells for k in (0, 1))
        for s in range(len(maps[0]))
    ]
    out = []
    for first in range(0, len(maps), batch):
        rows = list(range(first, min(first + batch, len(maps))))
        rows += rows[:1] * (batch - len(rows))
        stacked = [np.stack([_pad_to(maps[i][s], hw) for i in rows]) for s, hw in enumerate(shapes)]
        feats = jax.tree.map(np.asarray, detect(stacked, method, pad_cells=pad_cells, **kwargs))
        out += [
            jax.tree.map(lambda x, j=j: x[j], feats) for j in range(min(batch, len(maps) - first))
        ]
    return out


def _pad_to(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.pad(a, ((0, hw[0] - a.shape[0]), (0, hw[1] - a.shape[1]), (0, 0)))


def extract_features(
    model: RetrievalNet,
    variables: Mapping[str, Any],
    images: Sequence[ImageLike],
    *,
    database: bool,
    method: str = "mser",
    scales: Sequence[float] = DEFAULT_SCALES,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    max_side: int | None = 1024,
    crop_mode: str = "python",
    batch_size: int = 8,
    pad_multiple: int = 32,
    window: int = 256,
    progress: bool | None = None,
    validate: bool = True,
    **detect_kwargs: Any,
) -> LocalFeatures:
    """DSM features ``(N, M)`` of images: :func:`activation_maps`, then :func:`detect` per image.

    Args:
      model, variables: the network (see :func:`dsm_network`) and its variables.
      images: ``(H, W, 3)`` float images in [0, 1] or image paths.
      database: database images (NMS, 10 per channel) or queries (20 per channel).
      method: ``'mser'`` (the paper) or ``'maxima'`` (device, ``batch_size`` images at a time).
      scales, bboxes, max_side, crop_mode, batch_size, pad_multiple, window, validate: as
        :func:`activation_maps` (``bboxes``: query boxes ``(x1, y1, x2, y2)``).
      progress: show a progress bar (default: more than 64 images).
      **detect_kwargs: options of :func:`detect` (``max_features``, ``burst_rule``, …).
    """
    pad_cells = check_positive_int(detect_kwargs.pop("pad_cells", 8), "pad_cells")
    windows = activation_maps(
        model,
        variables,
        images,
        scales,
        bboxes=bboxes,
        max_side=max_side,
        crop_mode=crop_mode,
        batch_size=batch_size,
        pad_multiple=pad_multiple,
        window=window,
        validate=validate,
    )
    sets = []
    show = show_progress(progress, len(images))
    with tqdm(total=len(images), desc="dsm features", disable=not show) as bar:
        for _, maps in windows:
            kwargs = dict(database=database, validate=validate, **detect_kwargs)
            sets += _detect_many(maps, method, pad_cells, batch_size, **kwargs)
            bar.update(len(maps))
    return stack_features(sets)
