"""Global-descriptor network: backbone → pooling → ℓ2 → [whitening FC → ℓ2] (SPEC §4.1, §3.3).

This is the cirtorch / GeM head (Radenović, Tolias & Chum, TPAMI 2018, [000] L2566–2580,
L2137–2138): MAC, SPoC or GeM with a learnable ``p`` (init 3.0), ℓ2-normalisation, then an
optional whitening as a Dense layer with bias initialised from a learned whitening
(``W = P[:D']``, ``b = −P[:D'] m``, see :func:`set_whitening`), and a final ℓ2-normalisation.

Images enter in [0, 1] NHWC; the module subtracts ``mean`` and divides by ``std`` itself (ImageNet
statistics by default, as torchvision-based models expect). Parameter tree::

    params:      features/… (the backbone), p (GeM only, () or (C,)), whiten/{kernel, bias}
    batch_stats: features/… (ResNet BatchNorm running statistics)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import check_floating, check_ndim
from jret.models.resnet import RESNET_CONFIGS, ResNet, resnet
from jret.models.vgg import VGG, vgg16
from jret.normalize import l2n
from jret.pooling import gem, mac, spoc

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
POOLINGS = ("gem", "mac", "spoc")
BACKBONES = (*RESNET_CONFIGS, "vgg16")


def build_backbone(name: str, **kwargs: Any) -> ResNet | VGG:
    """Backbone by name: ``'resnet18'`` … ``'resnet152'`` or ``'vgg16'``; ``kwargs`` go to it."""
    if name == "vgg16":
        return vgg16(**kwargs)
    if name in RESNET_CONFIGS:
        return resnet(name, **kwargs)
    raise ValueError(f"backbone: expected one of {list(BACKBONES)}, got {name!r}")


def normalize_images(
    x: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None
) -> jax.Array:
    """Per-channel ``(x − mean) / std`` on images ``(N, H, W, C)``; ``None`` skips a step.

    MatConvNet-era models that take [0, 255] inputs minus the mean pixel use
    ``mean = pixel / 255`` and ``std = (1/255,) * 3``.
    """
    if mean is not None:
        x = x - jnp.asarray(mean, dtype=x.dtype)
    if std is not None:
        x = x / jnp.asarray(std, dtype=x.dtype)
    return x


def feature_mask(
    mask: jax.Array, out_hw: tuple[int, int], stride: int, anchor: str = "first"
) -> jax.Array:
    """Sample an image validity mask ``(N, H, W)`` on a feature grid ``(N, H', W')``.

    Cell ``i`` reads pixel ``i·stride`` (``anchor='first'``, nets whose output size is
    ⌈H/stride⌉, e.g. ResNet) or ``i·stride + stride − 1`` (``anchor='last'``, ⌊H/stride⌋, e.g.
    VGG). For an image padded at the bottom/right, the valid cells are then exactly those of the
    image's own, unpadded feature map.
    """
    if anchor not in ("first", "last"):
        raise ValueError(f"anchor: expected 'first' or 'last', got {anchor!r}")
    offset = stride - 1 if anchor == "last" else 0
    rows = jnp.minimum(jnp.arange(out_hw[0]) * stride + offset, mask.shape[1] - 1)
    cols = jnp.minimum(jnp.arange(out_hw[1]) * stride + offset, mask.shape[2] - 1)
    return jnp.asarray(mask, dtype=bool)[:, rows][:, :, cols]


class RetrievalNet(nn.Module):
    """Backbone + global pooling + optional whitening; returns ℓ2-normalised ``(N, D)`` rows.

    Attributes:
      backbone: ``'resnet18'`` … ``'resnet152'`` or ``'vgg16'``.
      backbone_kwargs: extra arguments for :func:`build_backbone` (e.g. ``num_stages``,
        ``dilate_last_stage``, ``pool5``, ``width``).
      pooling: ``'gem'`` (default), ``'mac'`` or ``'spoc'``.
      p: GeM power at initialisation (3.0, [000] L3248–3269); a learnable parameter ``'p'``.
      p_per_channel: one ``p`` per channel, shape ``(C,)``, instead of a shared scalar.
      whiten_dim: output size of the whitening Dense layer; None for no whitening.
      whiten_bias: the whitening layer has a bias (needed for ``b = −P m``).
      mean, std: input normalisation of [0, 1] images (ImageNet by default); None skips it.
      dtype: backbone compute dtype (e.g. ``jnp.bfloat16``); pooling and whitening run in float32.
    """

    backbone: str = "resnet50"
    backbone_kwargs: Mapping[str, Any] | None = None
    pooling: str = "gem"
    p: float = 3.0
    p_per_channel: bool = False
    whiten_dim: int | None = None
    whiten_bias: bool = True
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        self.features = build_backbone(
            self.backbone, dtype=self.dtype, **dict(self.backbone_kwargs or {})
        )
        if self.pooling == "gem":
            shape = (self.features.out_channels,) if self.p_per_channel else ()
            self.gem_p = self.param("p", lambda _, s: jnp.full(s, self.p, jnp.float32), shape)
        if self.whiten_dim is not None:
            self.whiten = nn.Dense(self.whiten_dim, use_bias=self.whiten_bias)

    def backbone_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Float32 post-ReLU feature maps ``(N, H', W', C)`` of [0, 1] images ``(N, H, W, 3)``."""
        check_ndim(x, "x", (4,), "images (N, H, W, C)")
        check_floating(x, "x")
        x = normalize_images(x.astype(jnp.float32), self.mean, self.std)
        return self.features(x, train=train).astype(jnp.float32)

    def head(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Descriptors ``(N, D)`` of feature maps ``(N, H', W', C)``; ``mask``: ``(N, H', W')``."""
        if self.pooling == "gem":
            x = gem(features, self.gem_p, mask=mask)
        else:
            x = (mac if self.pooling == "mac" else spoc)(features, mask=mask)
        x = l2n(x)
        if self.whiten_dim is not None:
            x = l2n(self.whiten(x))
        return x

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """Descriptors ``(N, D)`` of images ``(N, H, W, 3)`` in [0, 1].

        ``mask`` ``(N, H, W)`` bool marks the valid pixels of images padded into one batch; it is
        sampled on the feature grid (:func:`feature_mask`) and excludes padded cells from pooling.
        ``train`` is passed to the backbone; it only matters for a ResNet with ``frozen_bn=False``.
        """
        if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(x)[:3]):
            raise ValueError(
                f"mask: expected shape {np.shape(x)[:3]} (N, H, W), got {np.shape(mask)}"
            )
        f = self.backbone_features(x, train=train)
        if mask is not None:
            mask = feature_mask(mask, f.shape[1:3], self.features.stride, self.features.mask_anchor)
        return self.head(f, mask)


def init_retrieval_net(
    key: jax.Array,
    backbone: str,
    input_shape: tuple[int, int, int, int] = (1, 64, 64, 3),
    **kwargs: Any,
) -> dict[str, Any]:
    """Variables of ``RetrievalNet(backbone, **kwargs)`` initialised on zeros(``input_shape``)."""
    model = RetrievalNet(backbone=backbone, **kwargs)
    return jax.jit(model.init)(key, jnp.zeros(input_shape, jnp.float32))


def set_whitening(variables: Mapping[str, Any], whitening: Any, dims: int | None = None) -> dict:
    """Initialise the ``whiten`` Dense layer from a learned whitening (SPEC §3.3, [000] L2919).

    ``kernel = P[:dims]ᵀ`` and ``bias = −P[:dims] m``, so that ``x @ kernel + bias`` equals
    ``(x − m) @ P[:dims]ᵀ``. ``whitening`` has fields ``m (D,)`` and ``P (D', D)``
    (:class:`jret.whitening.Whitening`); ``dims`` defaults to the layer's ``whiten_dim`` and must
    equal it. Returns new variables; the input is not modified.
    """
    params = variables["params"]
    if "whiten" not in params:
        raise ValueError("variables: no 'whiten' layer; build RetrievalNet with whiten_dim set")
    layer = params["whiten"]
    if "bias" not in layer:
        raise ValueError("variables: the 'whiten' layer has no bias; use whiten_bias=True")
    d_in, d_out = layer["kernel"].shape
    dims = d_out if dims is None else dims
    m, P = jnp.asarray(whitening.m, jnp.float32), jnp.asarray(whitening.P, jnp.float32)
    if dims != d_out:
        raise ValueError(f"dims: the whitening layer outputs {d_out} dimensions, got dims={dims}")
    if P.ndim != 2 or P.shape[1] != d_in or P.shape[0] < dims:
        raise ValueError(f"whitening.P: expected shape (>= {dims}, {d_in}), got {P.shape}")
    if m.shape != (d_in,):
        raise ValueError(f"whitening.m: expected shape ({d_in},), got {m.shape}")
    Pd = P[:dims]
    whiten = {"kernel": Pd.T, "bias": -(Pd @ m)}
    return {**variables, "params": {**params, "whiten": whiten}}
