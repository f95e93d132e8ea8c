"""ResNet-18/34/50/101/152 trunks (He et al., CVPR 2016) in the torchvision v1.5 layout.

The module returns the last convolutional activations ``(N, H', W', C)`` after the final ReLU;
the global average pool and the classifier are removed, as in cirtorch, HOW and the GeM paper
(SPEC §4.1). BatchNorm is frozen by default (SPEC §4.2): it always normalises with the running
statistics (``batch_stats`` collection), while its scale and bias stay trainable parameters.

Parameter tree: every Flax path is the torchvision module path split on ``'.'``, e.g.
``layer1.0.downsample.1`` ↦ ``('layer1', '0', 'downsample', '1')``. Leaves are renamed
``weight`` ↦ ``kernel`` (conv, HWIO) or ``scale`` (BatchNorm), ``running_mean`` ↦ ``mean`` and
``running_var`` ↦ ``var`` (both in ``batch_stats``). ``jret.models.convert`` relies on this.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-5  # torch.nn.BatchNorm2d default


def _conv(
    features: int,
    kernel: int,
    stride: int = 1,
    dilation: int = 1,
    *,
    dtype: Any,
    name: str,
) -> nn.Conv:
    """Bias-free convolution with torch's symmetric padding ``dilation · (kernel − 1) / 2``."""
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _batch_norm(use_running_average: bool, *, dtype: Any, name: str) -> nn.BatchNorm:
    """BatchNorm with torch's eps (1e-5) and momentum (0.1, i.e. Flax momentum 0.9)."""
    return nn.BatchNorm(
        use_running_average=use_running_average,
        momentum=0.9,
        epsilon=BN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class Downsample(nn.Module):
    """Projection shortcut: 1×1 conv ``'0'`` + BatchNorm ``'1'`` (torchvision's Sequential)."""

    features: int
    stride: int
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.features, 1, self.stride, dtype=self.dtype, name="0")(x)
        return _batch_norm(self.use_running_average, dtype=self.dtype, name="1")(x)


class BasicBlock(nn.Module):
    """Two 3×3 convs (ResNet-18/34); the stride sits on ``conv1``."""

    planes: int
    stride: int = 1
    dilation: int = 1
    use_running_average: bool = True
    dtype: Any = jnp.float32
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = functools.partial(_batch_norm, self.use_running_average, dtype=self.dtype)
        out = _conv(self.planes, 3, self.stride, self.dilation, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(norm(name="bn1")(out))
        out = _conv(self.planes, 3, 1, self.dilation, dtype=self.dtype, name="conv2")(out)
        out = norm(name="bn2")(out)
        return nn.relu(out + _shortcut(self, x))


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 (×4 channels) block (ResNet-50/101/152); stride on the 3×3 conv (v1.5)."""

    planes: int
    stride: int = 1
    dilation: int = 1
    use_running_average: bool = True
    dtype: Any = jnp.float32
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = functools.partial(_batch_norm, self.use_running_average, dtype=self.dtype)
        out = _conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(norm(name="bn1")(out))
        out = _conv(self.planes, 3, self.stride, self.dilation, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(norm(name="bn2")(out))
        out = _conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(out)
        out = norm(name="bn3")(out)
        return nn.relu(out + _shortcut(self, x))


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array) -> jax.Array:
    """Identity, or the ``downsample`` projection when the stride or the width changes."""
    out_features = block.planes * block.expansion
    if block.stride == 1 and x.shape[-1] == out_features:
        return x
    return Downsample(
        out_features,
        block.stride,
        block.use_running_average,
        dtype=block.dtype,
        name="downsample",
    )(x)


class ResNetStage(nn.Module):
    """``layer{k}`` of torchvision: ``num_blocks`` blocks named ``'0'``, ``'1'``, ….

    With ``dilate`` the stage keeps the resolution (torchvision ``replace_stride_with_dilation``):
    the first block runs with stride 1 and dilation 1, the following ones with dilation 2.
    """

    block: type[BasicBlock] | type[Bottleneck]
    planes: int
    num_blocks: int
    stride: int
    dilate: bool = False
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        first_stride = 1 if self.dilate else self.stride
        later_dilation = self.stride if self.dilate else 1
        for i in range(self.num_blocks):
            x = self.block(
                self.planes,
                stride=first_stride if i == 0 else 1,
                dilation=1 if i == 0 else later_dilation,
                use_running_average=self.use_running_average,
                dtype=self.dtype,
                name=str(i),
            )(x)
        return x


class ResNet(nn.Module):
    """ResNet trunk returning the conv5_x activations ``(N, ⌈H/32⌉, ⌈W/32⌉, C)`` (post-ReLU).

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      block: ``BasicBlock`` or ``Bottleneck``.
      width: channels of the first stage (64 in every torchvision ResNet).
      num_stages: residual stages kept (4; 3 gives HOW's "¬R" trunk ending at conv4_x).
      dilate_last_stage: keep stride 16 by dilating the last kept stage (DSM's ResNet↑, SPEC §4.1).
      frozen_bn: BatchNorm always uses the running statistics (default True, SPEC §4.2); when
        False, ``train=True`` normalises with batch statistics and updates ``batch_stats``
        (Flax uses the biased batch variance for the update, torch the unbiased one).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    stage_sizes: Sequence[int]
    block: type[BasicBlock] | type[Bottleneck]
    width: int = 64
    num_stages: int = 4
    dilate_last_stage: bool = False
    frozen_bn: bool = True
    dtype: Any = jnp.float32
    mask_anchor: ClassVar[str] = "first"  # output size ⌈H / stride⌉ (padded strided convs)

    @property
    def out_channels(self) -> int:
        """Channels C of the output feature map."""
        return self.width * 2 ** (self.num_stages - 1) * self.block.expansion

    @property
    def stride(self) -> int:
        """Total stride: one output cell per ``stride`` input pixels."""
        return 2 ** (self.num_stages + 1) // (2 if self.dilate_last_stage else 1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Map images ``(N, H, W, 3)`` (already mean/std normalised) to ``(N, H', W', C)``."""
        if not 1 <= self.num_stages <= len(self.stage_sizes):
            raise ValueError(
                f"num_stages: expected 1..{len(self.stage_sizes)}, got {self.num_stages}"
            )
        use_ra = self.frozen_bn or not train
        x = x.astype(self.dtype)
        x = _conv(self.width, 7, 2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(_batch_norm(use_ra, dtype=self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for k in range(self.num_stages):
            x = ResNetStage(
                self.block,
                self.width * 2**k,
                self.stage_sizes[k],
                stride=1 if k == 0 else 2,
                dilate=self.dilate_last_stage and k == self.num_stages - 1,
                use_running_average=use_ra,
                dtype=self.dtype,
                name=f"layer{k + 1}",
            )(x)
        return x


RESNET_CONFIGS: dict[str, tuple[tuple[int, ...], type[BasicBlock] | type[Bottleneck]]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
    "resnet152": ((3, 8, 36, 3), Bottleneck),
}


def resnet(name: str, **kwargs: Any) -> ResNet:
    """Build a torchvision-layout ResNet by name (``'resnet18'`` … ``'resnet152'``).

    ``kwargs`` go to :class:`ResNet` (``width``, ``num_stages``, ``dilate_last_stage``,
    ``frozen_bn``, ``dtype``; ``stage_sizes`` or ``block`` override the named configuration).
    """
    if name not in RESNET_CONFIGS:
        raise ValueError(f"name: expected one of {sorted(RESNET_CONFIGS)}, got {name!r}")
    stage_sizes, block = RESNET_CONFIGS[name]
    return ResNet(**{"stage_sizes": stage_sizes, "block": block, **kwargs})
