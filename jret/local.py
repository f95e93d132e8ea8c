"""HOW local features: attention, smoothing and whitening on CNN activations, multi-scale selection.

Tolias, Jenicek & Chum, "Learning and aggregating deep local descriptors for instance-level
recognition", ECCV 2020 ([003] L80–172; SPEC §5.1). For a backbone activation map ``U (H, W, D)``:

1. attention on the raw activations, ``w(u) = ‖u‖₂`` (``sqrt(Σ u² + 1e-10)``, no parameters);
2. smoothing ``ū = h(u)``: 3×3 average pooling, stride 1, padded cells not counted;
3. whitening and reduction ``o(ū) = P(ū − m)``, a 1×1 convolution with bias ``−P m`` to
   d = 128, initialised by PCA-whitening (shrinkage s = 1) of smoothed descriptors of training
   images and kept fixed;
4. training head ``Z = l2n(Σ_p w(u_p) o(ū_p))`` (weighted SPoC, :meth:`HOWNet.__call__`), trained
   with a contrastive loss by :func:`jret.train.state.train_step` like the global networks, the
   whitening frozen (``make_optimizer(params, frozen=FROZEN)``);
5. test time: the image at scales (2, 1.414, 1, 0.707, 0.5, 0.353, 0.25), the strongest n = 1000
   locations by ``w(u)`` over all scales jointly; their ``o(ū)`` vectors (not ℓ2-normalised) form
   the set indexed with ASMK★ (:mod:`jret.ivf`).

Local sets are padded (:class:`LocalSet`): descriptors ``(N, n, d)`` with ``mask``, attention
``strength`` (divided by the image's maximum over scales, as the reference code), ``location``
``(y, x)`` in cells of that scale's feature map, and ``scale``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from jret._checks import check_finite, check_floating, check_ndim, check_positive_int
from jret.extract import (
    _describe,
    check_extract_args,
    describe_images,
    pad_value,
    prepared_windows,
    show_progress,
    unbind_model,
)
from jret.models import convert
from jret.models.resnet import ResNet
from jret.models.retrieval import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    feature_mask,
    normalize_images,
)
from jret.normalize import l2n
from jret.pooling import weighted_spoc
from jret.whitening import Whitening, pca_whiten_from_moments

HOW_SCALES = (2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25)
N_FEATURES = 1000
DIM = 128
SMOOTHING = 3
ATTENTION_EPS = 1e-10
FROZEN = ("^whiten/",)  # parameter paths of the frozen whitening, for the optimiser
_TINY = float(np.finfo(np.float32).tiny)


@flax.struct.dataclass
class LocalSet:
    """Padded local features of one image ``(M, …)`` or a batch ``(N, M, …)``.

    Attributes:
      des: ``(..., M, d)`` float32 descriptors.
      mask: ``(..., M)`` bool, True for real features.
      strength: ``(..., M)`` float32 attention (0 on padding).
      location: ``(..., M, 2)`` int32 ``(y, x)`` feature-map cell at the feature's scale.
      scale: ``(..., M)`` float32 image scale the feature comes from.
    """

    des: jax.Array
    mask: jax.Array
    strength: jax.Array
    location: jax.Array
    scale: jax.Array


def attention(u: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """HOW attention ``w(u) = sqrt(Σ_c u_c² + 1e-10)`` of activations ``(..., H, W, C)``.

    Computed on the raw activations, before smoothing ([003] L101). Masked cells get 0.
    """
    check_floating(u, "u")
    w = jnp.sqrt(jnp.sum(jnp.square(u), axis=-1) + ATTENTION_EPS)
    return w if mask is None else jnp.where(mask, w, 0.0)


def smooth(u: jax.Array, mask: jax.Array | None = None, size: int = SMOOTHING) -> jax.Array:
    """``size × size`` average pooling, stride 1, "same" output, padded cells not counted.

    HOW's local smoothing ``h`` ([003] L105, M = 3; torch ``avg_pool2d(count_include_pad=False)``).
    Cells outside ``mask`` (images padded into one batch) count as padding and come out 0.

    Args:
      u: ``(H, W, C)`` or ``(N, H, W, C)`` activations.
      mask: optional ``(H, W)`` / ``(N, H, W)`` validity.
      size: the odd window size M (default 3).
    """
    check_ndim(u, "u", (3, 4), "activations (H, W, C) or (N, H, W, C)")
    check_floating(u, "u")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size: expected an odd positive window, got {size}")
    valid = jnp.ones(u.shape[:-1], u.dtype) if mask is None else jnp.asarray(mask, u.dtype)
    window = (1,) * (u.ndim - 3) + (size, size, 1)
    strides = (1,) * u.ndim
    total = lax.reduce_window(u * valid[..., None], 0.0, lax.add, window, strides, "SAME")
    count = lax.reduce_window(valid, 0.0, lax.add, window[:-1], strides[:-1], "SAME")
    return jnp.where(valid[..., None] > 0, total / jnp.maximum(count, 1.0)[..., None], 0.0)


def reduce_dim(u_bar: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The 1×1 convolution ``o(ū) = ū K + b`` with ``K (D, d)``, ``b (d,)`` (= ``P(ū − m)``)."""
    return jnp.einsum("...c,cd->...d", u_bar, kernel, precision=lax.Precision.HIGHEST) + bias


def how_global(
    u: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    mask: jax.Array | None = None,
    size: int = SMOOTHING,
) -> jax.Array:
    """HOW training head ``Z = l2n(Σ_p w(u_p) · o(ū_p))`` ([003] L113–115, eq. 7–8).

    Args:
      u: activations ``(N, H, W, D)``; ``kernel (D, d)``, ``bias (d,)``: the whitening ``o``.
      mask: optional ``(N, H, W)`` validity (padded cells contribute nothing).

    Returns ℓ2-normalised ``(N, d)``.
    """
    o = reduce_dim(smooth(u, mask, size), kernel, bias)
    return l2n(weighted_spoc(o, attention(u, mask), mask))


class FrozenConv1x1(nn.Module):
    """1×1 convolution whose parameters receive no gradient (HOW's fixed whitening, lr = 0).

    Parameters ``kernel (1, 1, D, d)`` (HWIO) and ``bias (d,)``. Exclude it from weight decay in the
    optimiser as well: ``jret.train.make_optimizer(params, frozen=FROZEN)``.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return reduce_dim(x, lax.stop_gradient(kernel)[0, 0], lax.stop_gradient(bias))


class HOWNet(nn.Module):
    """HOW network: backbone → attention / smoothing → frozen whitening (SPEC §5.1).

    ``__call__`` returns the training head's global descriptor ``Z (N, d)``; :meth:`local`
    returns the dense local descriptors and attention used at test time.

    Attributes:
      backbone: ``'resnet18'`` … ``'resnet152'`` or ``'vgg16'``.
      backbone_kwargs: extra :func:`jret.models.build_backbone` arguments, e.g. ``num_stages=3``
        for HOW's ¬R50 (no conv5_x, D = 1024).
      dim: d, the whitened dimension (128).
      smoothing: M, the smoothing window (3).
      mean, std: input normalisation of [0, 1] images (ImageNet).
      dtype: backbone compute dtype.

    Parameters: ``features/…`` (backbone), ``whiten/{kernel (1, 1, D, d), bias (d,)}``.
    """

    backbone: str = "resnet50"
    backbone_kwargs: Mapping[str, Any] | None = None
    dim: int = DIM
    smoothing: int = SMOOTHING
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.features = build_backbone(
            self.backbone, dtype=self.dtype, **dict(self.backbone_kwargs or {})
        )
        self.whiten = FrozenConv1x1(self.dim)

    def activations(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """Float32 activations ``(N, H', W', D)`` of [0, 1] images and the feature-grid mask."""
        check_ndim(x, "x", (4,), "images (N, H, W, C)")
        check_floating(x, "x")
        if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(x)[:3]):
            raise ValueError(
                f"mask: expected shape {np.shape(x)[:3]} (N, H, W), got {np.shape(mask)}"
            )
        x = normalize_images(x.astype(jnp.float32), self.mean, self.std)
        u = self.features(x, train=train).astype(jnp.float32)
        if mask is not None:
            mask = feature_mask(mask, u.shape[1:3], self.features.stride, self.features.mask_anchor)
        return u, mask

    def smoothed(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Smoothed activations ``ū (N, H', W', D)``, attention ``w (N, H', W')`` and grid mask."""
        u, fmask = self.activations(x, mask, train)
        return smooth(u, fmask, self.smoothing), attention(u, fmask), fmask

    def local(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Local descriptors ``o(ū) (N, H', W', d)``, attention ``(N, H', W')`` and grid mask."""
        u_bar, w, fmask = self.smoothed(x, mask, train)
        return self.whiten(u_bar), w, fmask

    def pooled(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """The attention-weighted sum ``Σ_p w(u_p) o(ū_p)`` ``(N, d)``, before ℓ2 (SPEC §2.5)."""
        o, w, fmask = self.local(x, mask, train)
        return weighted_spoc(o, w, fmask)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """Training head: ℓ2-normalised ``Z (N, d)`` of images ``(N, H, W, 3)`` in [0, 1]."""
        return l2n(self.pooled(x, mask, train))


def init_how_net(
    key: jax.Array,
    backbone: str = "resnet50",
    input_shape: tuple[int, int, int, int] = (1, 64, 64, 3),
    **kwargs: Any,
) -> dict[str, Any]:
    """Variables of ``HOWNet(backbone, **kwargs)`` initialised on zeros(``input_shape``)."""
    model = HOWNet(backbone=backbone, **kwargs)
    return jax.jit(model.init)(key, jnp.zeros(input_shape, jnp.float32))


def set_how_whitening(variables: Mapping[str, Any], whitening: Whitening) -> dict[str, Any]:
    """Initialise the whitening conv from a PCA-whitening ``(m, P)``: ``K = P[:d]ᵀ``, ``b = −P[:d] m``.

    ``whitening.P`` needs at least d rows over the backbone's D channels. Returns new variables.
    """
    params = variables["params"]
    kernel = params["whiten"]["kernel"]
    d_in, d = kernel.shape[2], kernel.shape[3]
    m, P = jnp.asarray(whitening.m, jnp.float32), jnp.asarray(whitening.P, jnp.float32)
    if P.ndim != 2 or P.shape[1] != d_in or P.shape[0] < d or m.shape != (d_in,):
        raise ValueError(
            f"whitening: expected m ({d_in},) and P (>= {d}, {d_in}), got {m.shape} and {P.shape}"
        )
    whiten = {"kernel": P[:d].T.reshape(1, 1, d_in, d), "bias": -(P[:d] @ m)}
    return {**variables, "params": {**params, "whiten": whiten}}


def select_top(
    des: jax.Array,
    strength: jax.Array,
    mask: jax.Array,
    location: jax.Array,
    scale: jax.Array,
    n: int = N_FEATURES,
) -> LocalSet:
    """Keep the ``n`` strongest valid features of one image (all scales merged; jit-able).

    Args:
      des: ``(L, d)``; strength, mask, scale: ``(L,)``; location: ``(L, 2)``.
      n: features kept (static; 1000 by default). Fewer valid features leave padding.

    Returns a :class:`LocalSet` of ``n`` slots sorted by decreasing strength (ties: lower index).
    """
    n_slots = min(n, des.shape[0])
    top, idx = lax.top_k(jnp.where(mask, strength, -jnp.inf), n_slots)
    keep = jnp.isfinite(top)
    pad = n - n_slots

    def take(x):
        x = jnp.where(keep.reshape(-1, *([1] * (x.ndim - 1))), x[idx], 0)
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

    return LocalSet(
        des=take(des),
        mask=jnp.pad(keep, (0, pad)),
        strength=take(strength),
        location=take(location.astype(jnp.int32)),
        scale=take(scale.astype(jnp.float32)),
    )


def _top_cells(model: HOWNet, method, n: int):
    """Jitted ``(variables, x, mask) -> (B, n·(F + 4))``: per image, the ``n`` strongest valid
    cells of one scale as rows ``[values (F), attention, y, x, valid]`` (zero padding).

    Fixed-size rows let :func:`jret.extract._describe` batch images of any padded size; the
    strongest n over all scales are among the strongest n of each scale."""

    def fn(variables, x, mask):
        values, w, fmask = model.apply(variables, x, mask, method=method)
        b, h, wd, f = values.shape
        k = min(n, h * wd)
        top, idx = lax.top_k(jnp.where(fmask, w, -jnp.inf).reshape(b, h * wd), k)
        valid = jnp.isfinite(top)
        picked = jnp.take_along_axis(values.reshape(b, h * wd, f), idx[..., None], axis=1)
        extra = jnp.stack([top, idx // wd, idx % wd, valid], axis=-1).astype(jnp.float32)
        rows = jnp.where(valid[..., None], jnp.concatenate([picked, extra], axis=-1), 0.0)
        return jnp.pad(rows, ((0, 0), (0, n - k), (0, 0))).reshape(b, -1)

    return jax.jit(fn)


class _Batching(NamedTuple):
    """How images are prepared and batched (see :func:`extract_local`)."""

    max_side: int | None
    crop_mode: str
    batch_size: int
    pad_multiple: int
    window: int
    progress: bool | None
    validate: bool


_select_batch = jax.jit(jax.vmap(select_top, in_axes=(0, 0, 0, 0, 0, None)), static_argnums=5)


def _strongest_by_window(
    model, method, variables, images, bboxes, scales, n, opts: _Batching, label: str
) -> Iterator[tuple[int, LocalSet]]:
    """Per window of ``opts.window`` images, ``(first, LocalSet (B, n, …))`` in numpy: the ``n``
    strongest cells of all scales of each image, by attention divided by its maximum.

    ``method`` is :meth:`HOWNet.local` (whitened descriptors) or :meth:`HOWNet.smoothed`.
    """
    check_extract_args(images, bboxes, scales, opts.batch_size, opts.pad_multiple, opts.window)
    n = check_positive_int(n, "n")
    forward = _top_cells(model, method, n)
    batching = (opts.batch_size, opts.pad_multiple, pad_value(model))
    show = show_progress(opts.progress, len(images))
    with tqdm(total=len(images), desc=label, disable=not show) as bar:
        windows = prepared_windows(
            images, bboxes, opts.max_side, opts.crop_mode, opts.window, opts.validate
        )
        for first, prepared in windows:
            per_scale = [_describe(forward, variables, prepared, s, *batching) for s in scales]
            rows = np.concatenate([r.reshape(len(prepared), n, -1) for r in per_scale], axis=1)
            dim = rows.shape[-1] - 4
            strength = rows[..., dim] / np.maximum(rows[..., dim].max(axis=1, keepdims=True), _TINY)
            scale = np.repeat(np.asarray(scales, np.float32), n)[None].repeat(len(prepared), 0)
            valid = rows[..., dim + 3] > 0
            cells = rows[..., dim + 1 : dim + 3]
            sets = _select_batch(rows[..., :dim], strength, valid, cells, scale, n)
            yield first, jax.device_get(sets)
            bar.update(len(prepared))


def extract_local(
    params: Any,
    images: Sequence[np.ndarray | str | os.PathLike],
    scales: Sequence[float] = HOW_SCALES,
    n: int = N_FEATURES,
    *,
    model: HOWNet | None = None,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    max_side: int | None = 1024,
    crop_mode: str = "python",
    batch_size: int = 8,
    pad_multiple: int = 32,
    window: int = 256,
    progress: bool | None = None,
    validate: bool = True,
) -> LocalSet:
    """HOW multi-scale local features of images: a padded :class:`LocalSet` ``(N, n, …)``.

    Each image is loaded, cropped to its box, shrunk to ``max_side`` (as
    :func:`jret.extract.prepare_image`), resized by every scale (bilinear), described by
    :meth:`HOWNet.local`; the attention is divided by its maximum over the image's scales and the
    ``n`` strongest locations of all scales are kept ([003] L119, L163; SPEC §5.1 defaults:
    7 scales, n = 1000, max side 1024).

    Args:
      params: the network's variables with ``model=``, or a bound ``model.bind(variables)``.
      images: ``(H, W, 3)`` float images in [0, 1] or file paths.
      scales: test-time scales (default HOW's seven).
      n: features kept per image (default 1000).
      bboxes: optional query boxes ``(x1, y1, x2, y2)`` per image.
      batch_size, pad_multiple: batching of equal padded sizes (``pad_multiple=1`` and
        ``batch_size=1`` reproduce single-image processing exactly).
      window: images prepared at a time (memory ``window × len(scales) × n × (d + 4)`` floats).
      progress: progress bar (default: more than 64 images).
      validate: check inputs and outputs for NaN/inf.
    """
    model, variables = unbind_model(params, model, HOWNet)
    opts = _Batching(max_side, crop_mode, batch_size, pad_multiple, window, progress, validate)
    windows = _strongest_by_window(
        model, HOWNet.local, variables, images, bboxes, scales, n, opts, "extract local"
    )
    sets = [s for _, s in windows]
    out = jax.tree.map(lambda *x: jnp.asarray(np.concatenate(x)), *sets)
    if validate:
        check_finite(out.des, "descriptors")
    return out


def extract_how_global(
    params: Any,
    images: Sequence[np.ndarray | str | os.PathLike],
    scales: Sequence[float] = HOW_SCALES,
    *,
    model: HOWNet | None = None,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    max_side: int | None = 1024,
    crop_mode: str = "python",
    batch_size: int = 8,
    pad_multiple: int = 32,
    window: int = 256,
    progress: bool | None = None,
    validate: bool = True,
) -> np.ndarray:
    """HOW's global descriptor ``(N, d)``: the training head over several scales, the
    attention-weighted sums of every scale added, then one ℓ2 (HOW's global baseline, SPEC §2.5;
    default the 7 scales of :data:`HOW_SCALES`). Arguments as :func:`extract_local`; used to
    validate HOW training and as a global baseline next to ASMK★.
    """
    model, variables = unbind_model(params, model, HOWNet)
    forward = jax.jit(lambda v, x, m: model.apply(v, x, m, method=HOWNet.pooled))
    return describe_images(
        forward,
        variables,
        images,
        scales,
        lambda per_scale: l2n(jnp.sum(per_scale, axis=0)),
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


def smoothed_windows(
    params: Any,
    images: Sequence[np.ndarray | str | os.PathLike],
    *,
    model: HOWNet | None = None,
    n: int = N_FEATURES,
    scale: float = 1.0,
    max_side: int | None = 1024,
    batch_size: int = 8,
    pad_multiple: int = 32,
    window: int = 64,
    progress: bool | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Single-scale smoothed descriptors ``ū`` (before the whitening) of the strongest ``n``
    locations of each image, ``window`` images at a time: ``(rows (R, D), image index (R,))``.

    The training data of HOW's whitening ([003] L159); reduced with the whitening
    (:func:`reduce_dim`), the training data of its codebook ([003] L163). Rows are grouped by
    image, strongest first. Consumed window by window, the memory does not grow with the number
    of images.
    """
    model, variables = unbind_model(params, model, HOWNet)
    opts = _Batching(max_side, "python", batch_size, pad_multiple, window, progress, True)
    windows = _strongest_by_window(
        model, HOWNet.smoothed, variables, images, None, (scale,), n, opts, "train descriptors"
    )
    for first, sets in windows:
        image, slot = np.nonzero(sets.mask)
        yield sets.des[image, slot], first + image


def smoothed_descriptors(
    params: Any, images: Sequence[np.ndarray | str | os.PathLike], **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """All of :func:`smoothed_windows` (same arguments) at once: ``(R, D)``, ``(R,)``."""
    rows, owner = zip(*smoothed_windows(params, images, **options), strict=True)
    return np.concatenate(rows), np.concatenate(owner)


def learn_whitening(
    params: Any,
    images: Sequence[np.ndarray | str | os.PathLike],
    *,
    model: HOWNet | None = None,
    shrinkage: float = 1.0,
    **options: Any,
) -> Whitening:
    """PCA-whitening of HOW's smoothed descriptors, to initialise the frozen 1×1 conv.

    HOW ([003] L159, SPEC §5.1): single-scale descriptors of training images taken after smoothing
    and before reduction, the top ``n = 1000`` per image by attention
    (:func:`smoothed_windows`, which takes ``options``: ``n``, ``scale`` (1.0), ``max_side``,
    ``batch_size``, ``pad_multiple``, ``window``, ``progress``), PCA-whitening with shrinkage
    ``s = 1`` (eigenvalues floored at 1e-14, :func:`jret.whitening.pca_whiten_from_moments`),
    keeping the model's ``dim`` directions. The mean and covariance are accumulated in float64
    window by window, so 5,000 images × 1,000 descriptors need no more memory than one window.
    Apply it with :func:`set_how_whitening`.
    """
    model, _ = unbind_model(params, model, HOWNet)
    count, total, outer = 0, 0.0, 0.0
    for rows, _ in smoothed_windows(params, images, model=model, **options):
        rows = rows.astype(np.float64)
        count, total, outer = count + len(rows), total + rows.sum(0), outer + rows.T @ rows
    if count == 0:
        raise ValueError("images: no valid descriptor to fit the whitening on")
    m = total / count
    return pca_whiten_from_moments(m, outer / count - np.outer(m, m), shrinkage, dims=model.dim)


def _how_backbone(arch: str | nn.Module, backbone_dim: int | None) -> nn.Module:
    """The backbone of a HOW checkpoint: ResNets lose ``log2(C / backbone_dim)`` last stages."""
    if isinstance(arch, nn.Module):
        return convert._backbone(arch)
    full = convert._backbone(arch)
    if backbone_dim is None or not isinstance(full, ResNet) or backbone_dim == full.out_channels:
        return full
    skip = math.log2(full.out_channels / backbone_dim)
    if not skip.is_integer() or not 0 < skip < full.num_stages:
        raise ValueError(
            f"meta['backbone_dim']: {backbone_dim} is not {arch}'s output width "
            f"{full.out_channels} divided by a power of two"
        )
    return full.clone(num_stages=full.num_stages - int(skip))


def how_to_flax(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
    arch: str | nn.Module | None = None,
    strict: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Convert a released HOW checkpoint into :class:`HOWNet` variables.

    HOW checkpoints (``{'state_dict': …, 'meta': …}``) hold ``features.<i>.…`` (the torchvision
    children up to ``layer4``, or ``layer3`` for the ¬R models with ``meta['backbone_dim']`` 1024 /
    256) and the whitening ``dim_reduction.weight (d, D, 1, 1)`` / ``dim_reduction.bias (d,)``.

    Args:
      checkpoint: the dict, or a ``.pth`` / ``.npz`` path (:func:`jret.models.convert.load_checkpoint`).
      arch: backbone name or module; defaults to ``meta['architecture']`` truncated to
        ``meta['backbone_dim']``.
      strict: raise on keys that belong nowhere.

    Returns ``(variables, meta)``: ``params/features``, ``params/whiten/{kernel (1, 1, D, d),
    bias}``, ``batch_stats/features`` for ResNets. Build the module with :func:`how_net_from_meta`.
    """
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = convert.load_checkpoint(checkpoint)
    state_dict, meta = dict(checkpoint.get("state_dict") or {}), dict(checkpoint.get("meta") or {})
    reduction = ("dim_reduction.weight", "dim_reduction.bias")
    missing = [k for k in reduction if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict: missing keys: {', '.join(missing)} (the HOW whitening)")
    weight, bias = (convert._to_numpy(state_dict.pop(k)).astype(np.float32) for k in reduction)
    backbone = _how_backbone(
        meta.get("architecture") if arch is None else arch, meta.get("backbone_dim")
    )
    # the backbone is stored as in cirtorch (features.<i>.…), without a pooling parameter
    variables, _ = convert.cirtorch_to_flax(
        {"state_dict": state_dict, "meta": {"pooling": "mac"}}, backbone, strict=strict
    )
    if weight.ndim != 4 or weight.shape[1:] != (backbone.out_channels, 1, 1):
        raise ValueError(
            f"state_dict: dim_reduction.weight expected (d, {backbone.out_channels}, 1, 1), "
            f"got {weight.shape}"
        )
    if bias.shape != weight.shape[:1]:
        raise ValueError(
            f"state_dict: dim_reduction.bias expected {weight.shape[:1]}, got {bias.shape}"
        )
    variables["params"]["whiten"] = {
        "kernel": jnp.asarray(convert._from_torch(weight)),
        "bias": jnp.asarray(bias),
    }
    return variables, meta


def how_net_from_meta(meta: Mapping[str, Any], **kwargs: Any) -> HOWNet:
    """The :class:`HOWNet` matching a HOW checkpoint's meta (architecture, backbone_dim,
    outputdim); ``kwargs`` override fields."""
    fields: dict[str, Any] = {}
    if "architecture" in meta:
        fields["backbone"] = meta["architecture"]
        backbone = _how_backbone(meta["architecture"], meta.get("backbone_dim"))
        if isinstance(backbone, ResNet) and backbone.num_stages != 4:
            fields["backbone_kwargs"] = {"num_stages": backbone.num_stages}
    if "outputdim" in meta:
        fields["dim"] = int(meta["outputdim"])
    merged = {**fields, **kwargs}
    if "backbone_kwargs" in kwargs and "backbone_kwargs" in fields:
        merged["backbone_kwargs"] = {**fields["backbone_kwargs"], **kwargs["backbone_kwargs"]}
    return HOWNet(**merged)
