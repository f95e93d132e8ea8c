"""Multi-layer (hyper-column) assembling of conv feature maps (seed 004 §5.2.4, SPEC §10.6).

Maps of several layers are brought to the grid of the coarsest one by ``r × r`` max-pooling with
stride ``r`` (floor, as VGG's max-pools; conv5_1 and conv5_2 are pooled 2 × 2 to the pool5 grid)
and concatenated along channels; masks then apply to the assembled map as usual. Best in the seed:
``M_MAX(conv5_3, conv5_2, conv5_1)`` (K = 1536).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jret._checks import check_floating, check_ndim


def _pool_to(fm: jax.Array, hw: tuple[int, int], i: int) -> jax.Array:
    n, h, w, c = fm.shape
    r = h // hw[0]
    if r < 1 or h // r != hw[0] or w // r != hw[1]:
        raise ValueError(
            f"maps[{i}]: grid {(h, w)} does not max-pool to {hw} with an integer r × r window"
        )
    if r == 1:
        return fm
    crop = fm[:, : hw[0] * r, : hw[1] * r]
    return crop.reshape(n, hw[0], r, hw[1], r, c).max(axis=(2, 4))


def assemble_layers(maps: Sequence[jax.Array]) -> jax.Array:
    """Hyper-column map ``(N, H, W, ΣC)`` of ``maps`` ``[(N, H_l, W_l, C_l)]`` on the coarsest grid.

    The output keeps the order of ``maps`` along channels; ``(H, W)`` is the smallest grid, and
    every other grid must reduce to it by an integer ``r × r`` max-pool.
    """
    if not maps:
        raise ValueError("maps: expected at least one feature map")
    for i, fm in enumerate(maps):
        check_ndim(fm, f"maps[{i}]", (4,), "feature maps (N, H, W, C)")
        check_floating(fm, f"maps[{i}]")
    if len({fm.shape[0] for fm in maps}) != 1:
        raise ValueError(f"maps: expected the same batch size, got {[fm.shape for fm in maps]}")
    hw = min((fm.shape[1], fm.shape[2]) for fm in maps)
    return jnp.concatenate([_pool_to(jnp.asarray(fm), hw, i) for i, fm in enumerate(maps)], -1)
