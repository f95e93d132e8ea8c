"""VGG-16 convolutional trunk (Simonyan & Zisserman, ICLR 2015), no BatchNorm.

By default the output is conv5_3 + ReLU with the last max-pool dropped, stride 16, as in
cirtorch, the GeM paper and DSM; ``pool5=True`` keeps it (stride 32), as R-MAC and the selective
convolutional features paper use (SPEC §4.1).

Parameter tree: convolutions are named ``conv{block}_{layer}`` (``conv1_1`` … ``conv5_3``), each
with ``kernel`` (HWIO) and ``bias``; :func:`torch_indices` gives the matching index in
torchvision's ``features`` Sequential (``features.0`` ↦ ``conv1_1``, ``features.28`` ↦ ``conv5_3``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

VGG16_CFG: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


def torch_indices(cfg: Sequence[Sequence[int]] = VGG16_CFG) -> dict[str, int]:
    """Map each conv name to its index in torchvision's ``vgg.features`` (conv, ReLU, …, pool)."""
    indices, pos = {}, 0
    for b, block in enumerate(cfg):
        for i in range(len(block)):
            indices[f"conv{b + 1}_{i + 1}"] = pos
            pos += 2  # conv, ReLU
        pos += 1  # max-pool
    return indices


class VGG(nn.Module):
    """VGG trunk: blocks of 3×3 conv + ReLU separated by 2×2/2 max-pools.

    Attributes:
      cfg: output channels per conv, grouped by block (default VGG-16).
      pool5: keep the max-pool after the last block (default False: conv5_3 + ReLU, stride 16).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

    Output ``(N, ⌊H/16⌋, ⌊W/16⌋, 512)`` for VGG-16 without pool5, post-ReLU.
    """

    cfg: Sequence[Sequence[int]] = VGG16_CFG
    pool5: bool = False
    dtype: Any = jnp.float32
    mask_anchor: ClassVar[str] = "last"  # output size ⌊H / stride⌋ (unpadded max-pools)

    @property
    def out_channels(self) -> int:
        """Channels C of the output feature map."""
        return self.cfg[-1][-1]

    @property
    def stride(self) -> int:
        """Total stride: one output cell per ``stride`` input pixels."""
        return 2 ** (len(self.cfg) - (0 if self.pool5 else 1))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Map images ``(N, H, W, 3)`` (already normalised) to ``(N, H', W', C)``.

        ``train`` is accepted for a uniform backbone interface; VGG has no train-time behaviour.
        """
        del train
        x = x.astype(self.dtype)
        for b, block in enumerate(self.cfg):
            for i, features in enumerate(block):
                conv = nn.Conv(
                    features,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"conv{b + 1}_{i + 1}",
                )
                x = nn.relu(conv(x))
            if self.pool5 or b < len(self.cfg) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x


def vgg16(**kwargs: Any) -> VGG:
    """VGG-16 trunk; ``kwargs`` go to :class:`VGG` (``pool5``, ``dtype``, or another ``cfg``)."""
    return VGG(**{"cfg": VGG16_CFG, **kwargs})
