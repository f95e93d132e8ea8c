"""The selective-convolutional-features pipeline of seed 004 (SPEC §10), learned and applied.

``padded locals (N, M, K) + mask → local PCA to d + ℓ2 → embedding φ → aggregation ψ →
rotation, drop, power law, ℓ2 → (N, D)``; the mask comes from :mod:`jret.masks`. Everything is
learned without labels on a learning set (never the test set): the local PCA and the anchors on
its masked locals, the embedding's whitening on the same locals, the rotation on its aggregated
vectors.

Defaults are the paper's: Temb + democratic aggregation (``M* + φ_Δ + ψ_d``), ``d`` and the
number of anchors per output dimension from :data:`TEMB_SETTINGS` (Table 4; the first 128
components are dropped, ``D = d·k − 128``), power law 0.5.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import check_finite, check_floating, check_ndim, check_positive_int
from jret.codebook import kmeans
from jret.embed._common import FIT_CHUNK
from jret.embed.aggregate import democratic, sum_pool
from jret.embed.faemb import FAemb, faemb, faemb_learn
from jret.embed.post import POWER, postprocess, postprocess_learn
from jret.embed.preprocess import local_pca, local_pca_learn
from jret.embed.temb import Temb, temb, temb_learn
from jret.embed.vlad import vlad
from jret.normalize import l2n
from jret.whitening import Whitening

# Final dimension D -> (d, number of anchors) for Temb (seed 004 Table 4); D = d·k − 128.
TEMB_SETTINGS: dict[int, tuple[int, int]] = {
    512: (32, 20),
    1024: (64, 18),
    2048: (64, 34),
    4096: (64, 66),
    8064: (128, 64),
}
TEMB_DROP = 128
# Same-dimension comparison, D = 4224 (seed 004 Table 2): embedding -> (d, codebook size).
SAME_DIM_SETTINGS: dict[str, tuple[int, int]] = {
    "vlad": (64, 66),
    "temb": (64, 68),
    "faemb": (32, 10),
}
EMBEDDINGS = ("temb", "faemb", "vlad")
AGGREGATIONS = ("democratic", "sum")


@flax.struct.dataclass
class Selective:
    """A learned pipeline: local ``pca``, the embedding's parameters (:class:`Temb`,
    :class:`FAemb`, or VLAD centroids ``(k, d)``), the post-processing ``rotation`` and the static
    choices."""

    pca: Whitening
    embedding: Temb | FAemb | jax.Array
    rotation: Whitening
    method: str = flax.struct.field(pytree_node=False, default="temb")
    aggregation: str = flax.struct.field(pytree_node=False, default="democratic")
    drop: int = flax.struct.field(pytree_node=False, default=TEMB_DROP)
    power: float = flax.struct.field(pytree_node=False, default=POWER)
    order: str = flax.struct.field(pytree_node=False, default="reference")

    @property
    def dim(self) -> int:
        return self.rotation.P.shape[0] - self.drop


def temb_setting(dim: int) -> tuple[int, int]:
    """``(d, k)`` of the paper's Temb pipeline for the final dimension ``dim`` (Table 4)."""
    if dim not in TEMB_SETTINGS:
        raise ValueError(f"dim: expected one of {sorted(TEMB_SETTINGS)}, got {dim!r}")
    return TEMB_SETTINGS[dim]


def default_drop(method: str, d: int) -> int:
    """Leading components removed after the rotation: 128 (Temb), ``d(d+1)`` (F-FAemb), 0 (VLAD)."""
    return {"temb": TEMB_DROP, "faemb": d * (d + 1), "vlad": 0}[method]


def embedding_dim(method: str, d: int, k: int) -> int:
    """Dimension of φ: ``d·k`` (Temb, VLAD) or ``k·d(d+1)/2`` (F-FAemb)."""
    return k * d * (d + 1) // 2 if method == "faemb" else k * d


def embed_locals(z: jax.Array, method: str, params: Temb | FAemb | jax.Array) -> jax.Array:
    """φ of pre-processed locals ``(..., d)`` for ``method`` in :data:`EMBEDDINGS`."""
    if method == "temb":
        return temb(z, params)
    if method == "faemb":
        return faemb(z, params)
    return vlad(z, params)


def aggregate(
    x: jax.Array,
    mask: jax.Array,
    pca: Whitening,
    embedding: Temb | FAemb | jax.Array,
    method: str = "temb",
    aggregation: str = "democratic",
) -> jax.Array:
    """ψ ``(N, D')`` of padded raw locals ``x (N, M, K)``, ``mask (N, M)``: local PCA, φ, ψ.

    Democratic aggregation of VLAD ℓ2-normalises each φ first (it requires unit vectors); Temb
    and F-FAemb are unit vectors already.
    """
    phi = embed_locals(local_pca(x, pca), method, embedding)
    if aggregation == "sum":
        return sum_pool(phi, mask)
    return democratic(l2n(phi) if method == "vlad" else phi, mask)


def selective_encode(x: jax.Array, mask: jax.Array, params: Selective) -> jax.Array:
    """Final descriptors ``(N, D)`` of padded raw locals ``x (N, M, K)``, ``mask (N, M)``; jit-able."""
    check_ndim(x, "x", (3,), "padded local features (N, M, K)")
    check_floating(x, "x")
    if tuple(np.shape(mask)) != tuple(x.shape[:2]):
        raise ValueError(f"mask: expected shape {x.shape[:2]}, got {np.shape(mask)}")
    psi = aggregate(
        x, jnp.asarray(mask, bool), params.pca, params.embedding, params.method, params.aggregation
    )
    return postprocess(psi, params.rotation, params.drop, params.power, params.order)


_encode_jit = jax.jit(selective_encode)
_local_pca_jit = jax.jit(local_pca)
_aggregate_jit = jax.jit(aggregate, static_argnames=("method", "aggregation"))


def map_batches(fn, *arrays: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``batch_size`` rows of ``arrays`` at a time (host loop), concatenated.

    The last batch is zero-padded to ``batch_size`` rows (padded masks are all False), so a
    jitted ``fn`` compiles once.
    """
    n = len(arrays[0])
    out = []
    for i in range(0, n, batch_size):
        rows = [a[i : i + batch_size] for a in arrays]
        pad = batch_size - len(rows[0])
        if pad:
            rows = [np.concatenate([r, np.zeros((pad, *r.shape[1:]), r.dtype)]) for r in rows]
        out.append(np.asarray(fn(*(jnp.asarray(r) for r in rows)))[: batch_size - pad])
    return np.concatenate(out)


def selective_describe(
    x: np.ndarray, mask: np.ndarray, params: Selective, batch_size: int = 32, validate: bool = True
) -> np.ndarray:
    """:func:`selective_encode` over ``batch_size`` images at a time (host loop, jitted batches)."""
    check_ndim(x, "x", (3,), "padded local features (N, M, K)")
    batch_size = check_positive_int(batch_size, "batch_size")
    if validate:
        check_finite(x, "x")
    fn = lambda xb, mb: _encode_jit(xb, mb, params)  # noqa: E731
    return map_batches(fn, np.asarray(x), np.asarray(mask, bool), batch_size=batch_size)


def selective_learn(
    key: jax.Array,
    x: np.ndarray,
    mask: np.ndarray,
    method: str = "temb",
    d: int = 32,
    k: int = 20,
    aggregation: str = "democratic",
    drop: int | None = None,
    power: float = POWER,
    order: str = "reference",
    kmeans_iters: int = 20,
    batch_size: int = 32,
) -> Selective:
    """Learn the pipeline on a learning set's padded locals ``x (N, M, K)`` and ``mask (N, M)``.

    Args:
      key: for k-means.
      x, mask: masked local features of the learning images (e.g. :func:`jret.masks.masked_locals`).
      method: ``'temb'`` (default), ``'faemb'`` or ``'vlad'``.
      d: local PCA dimension (default 32, the 512-D setting; see :func:`temb_setting`).
      k: anchors / bases / centroids (default 20).
      aggregation: ``'democratic'`` (default) or ``'sum'``.
      drop: leading components removed (default :func:`default_drop`).
      power: power-law exponent (default 0.5).
      order: post-processing order, ``'reference'`` (default) or ``'seed'``.
      kmeans_iters: Lloyd iterations of :func:`jret.codebook.kmeans` (default 20).
      batch_size: images per jitted batch when aggregating the learning set.
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"method: expected one of {EMBEDDINGS}, got {method!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    check_ndim(x, "x", (3,), "padded local features (N, M, K)")
    check_floating(x, "x")
    x, mask = np.asarray(x), np.asarray(mask, bool)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask: expected shape {x.shape[:2]}, got {mask.shape}")
    d, k = check_positive_int(d, "d"), check_positive_int(k, "k")
    drop = default_drop(method, d) if drop is None else drop
    dim = embedding_dim(method, d, k)
    if isinstance(drop, bool) or not isinstance(drop, int | np.integer) or not 0 <= drop < dim:
        raise ValueError(f"drop: expected an integer in [0, {dim}) (the embedding's), got {drop!r}")
    locals_ = x[mask]
    if len(locals_) < max(k, d):
        raise ValueError(
            f"mask: {len(locals_)} selected locals, need at least max(k, d) = {max(k, d)}"
        )
    pca = local_pca_learn(locals_, d)
    z = map_batches(lambda xb: _local_pca_jit(xb, pca), locals_, batch_size=FIT_CHUNK)
    anchors = kmeans(key, z, k, iters=kmeans_iters)
    if method == "temb":
        emb = temb_learn(z, anchors)
    elif method == "faemb":
        emb = faemb_learn(z, anchors)
    else:
        emb = jnp.asarray(anchors, jnp.float32)
    fn = lambda xb, mb: _aggregate_jit(xb, mb, pca, emb, method, aggregation)  # noqa: E731
    rotation = postprocess_learn(map_batches(fn, x, mask, batch_size=batch_size), order, power)
    return Selective(pca, emb, rotation, method, aggregation, int(drop), power, order)
