"""Inverted file for ASMK / ASMK★: one posting list per visual word of aggregated per-image vectors.

Semantics follow the selective match kernels paper (Tolias, Avrithis & Jégou, IJCV 2016,
[000] L1009–1017, L7453–7573) and the ``asmk`` package used by HOW (SPEC §6.6):

* Database image i is quantised (single assignment by default) and aggregated per word
  (:func:`jret.kernels.aggregate_flat`); list c holds ``(i, Φ(X_{i,c}))`` for every word c of i,
  packed signs for ASMK★ (``binary=True``, 16 bytes for d = 128) or ``l2n(Σ r)`` for ASMK.
  ``norm[i] = Σ_{c∈C_i} w_c`` (the number of words without IDF).
* A query is quantised with multiple assignment (5), aggregated the same way, and for each of
  its words c only list c is scanned::

      score[i] = Σ_{c∈C_q∩C_i} w_c σ_α(sim(Φ_q,c, Φ_i,c)) / sqrt(norm[i]) / sqrt(Σ_{c∈C_q} w_c)

  with ``σ_α(u) = u^α`` for ``u ≥ τ`` (α = 3, τ = 0), ``sim`` = ``1 − 2h/d`` (binary) or the dot
  product; images sharing no word score 0.
* IDF (``use_idf=True``): ``w_c = log(N / n_c)²``, n_c = number of images in list c, and 1 for an
  empty word, as the asmk package; it is recomputed over the whole index after :func:`add`.
* ``asmk_compat=True`` reproduces the asmk package bit for bit (a zero component of a residual
  sum gives bit 0, Hamming similarity over d rounded up to 32); scores then agree with it to
  float rounding. The default follows the seed (bit 1 at zero, the true d; SPEC §14.1 #26–27).

Layout (CSR, SPEC §6.6): ``offsets (k + 1,)``, ``entry_image (E,)`` (internal image index),
``entry_data (E, F)``; entries are sorted by word, then image. Scoring (:func:`score_sets`) is
written with gathers and scatter-adds only, so it jits on CPU, GPU and TPU: the postings of a block
of queries are walked ``chunk_size`` at a time in a ``fori_loop`` whose trip count is the number
of postings to visit. The database axis can be sharded over a mesh (``search(..., mesh=…)``):
each device scores the images of its contiguous range and the per-shard top-k are merged.

Sets come flat (descriptors ``(R, d)`` with an image id per row, as in the asmk package) or
padded (``(N, M, d)`` with an optional ``(N, M)`` mask).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jret import codebook, kernels
from jret._checks import (
    check_finite,
    check_floating,
    check_integer,
    check_ndim,
    check_positive_int,
)

FORMAT = "jret.ivf"
VERSION = 1
KERNELS = ("asmk",)
DEFAULT_CHUNK_SIZE = 1 << 16
DEFAULT_ROWS_PER_STEP = 1 << 16
DEFAULT_QUERY_BATCH = 16
_ARRAYS = ("centroids", "offsets", "entry_image", "entry_data", "image_ids")
_SLOT_MULTIPLE = 32
_MIN_ROWS = 1024


@flax.struct.dataclass
class Index:
    """An ASMK / ASMK★ inverted file (a pytree; the static fields describe how it was built).

    Attributes:
      centroids: ``(k, d)`` the codebook.
      offsets: ``(k + 1,)`` int32: list c is ``entry_*[offsets[c]:offsets[c + 1]]``.
      entry_image: ``(E,)`` int32 internal image index of each entry (0 … N − 1).
      entry_data: ``(E, ⌈d/32⌉)`` uint32 codes (binary) or ``(E, d)`` float32 vectors.
      image_ids: ``(N,)`` int32 the caller's id of each internal image.
      doc_freq: ``(k,)`` int32 entries per list (= images containing the word).
      weights: ``(k,)`` float32 word weights ``w_c`` (1, or the squared-log IDF).
      norm: ``(N,)`` float32 ``Σ_{c∈C_i} w_c``.
      binary: ASMK★ (True) or ASMK.
      nbits: the Hamming denominator (d, or d rounded up to 32 with ``asmk_compat``).
      use_idf: whether ``weights`` is the IDF.
      multiple_assignment: database-side assignment count used at build time.
      asmk_compat: signs and Hamming denominator as the asmk package (a zero component gives
        bit 0; ``nbits`` = d rounded up to 32).
    """

    centroids: jax.Array
    offsets: jax.Array
    entry_image: jax.Array
    entry_data: jax.Array
    image_ids: jax.Array
    doc_freq: jax.Array
    weights: jax.Array
    norm: jax.Array
    binary: bool = flax.struct.field(pytree_node=False, default=True)
    nbits: int = flax.struct.field(pytree_node=False, default=128)
    use_idf: bool = flax.struct.field(pytree_node=False, default=False)
    multiple_assignment: int = flax.struct.field(pytree_node=False, default=1)
    asmk_compat: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def n_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def n_entries(self) -> int:
        return int(self.entry_image.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.centroids.shape[0])


def _finalise(centroids, offsets, entry_image, entry_data, image_ids, **static) -> Index:
    """Derive ``doc_freq``, ``weights`` and ``norm`` from the primary arrays (host numpy)."""
    offsets = np.asarray(offsets, np.int64)
    entry_image = np.asarray(entry_image, np.int32)
    n = len(image_ids)
    doc_freq = np.diff(offsets).astype(np.int32)
    if static["use_idf"]:
        weights = np.asarray(kernels.idf_weights(doc_freq, max(n, 1), "log2"))
    else:
        weights = np.ones(len(doc_freq), np.float32)
    entry_word = np.repeat(np.arange(len(doc_freq)), doc_freq)
    norm = np.bincount(entry_image, weights=weights[entry_word], minlength=n).astype(np.float32)
    return Index(
        centroids=jnp.asarray(centroids, jnp.float32),
        offsets=jnp.asarray(offsets, jnp.int32),
        entry_image=jnp.asarray(entry_image),
        entry_data=jnp.asarray(entry_data),
        image_ids=jnp.asarray(np.asarray(image_ids, np.int32)),
        doc_freq=jnp.asarray(doc_freq),
        weights=jnp.asarray(weights, jnp.float32),
        norm=jnp.asarray(norm),
        **static,
    )


def _rows(des, image_ids, mask, name: str, first_id: int, validate: bool):
    """Flat rows ``(R, d)``, their internal image index ``(R,)`` and the ``(n,)`` image ids.

    Flat input: ids per row, images = sorted distinct ids. Padded input: image i = row i of the
    batch, ids ``image_ids (N,)`` or ``first_id + arange(N)``.
    """
    check_ndim(des, name, (2, 3), "descriptors (R, d) with image ids, or a padded set (N, M, d)")
    check_floating(des, name)
    if np.ndim(des) == 2:
        if image_ids is None:
            raise ValueError("image_ids: required with flat descriptors (one id per row)")
        if mask is not None:
            raise ValueError("mask: only for padded descriptors (N, M, d)")
        check_ndim(image_ids, "image_ids", (1,), "one image id per descriptor row (R,)")
        check_integer(image_ids, "image_ids")
        ids = np.asarray(image_ids)
        if ids.shape[0] != np.shape(des)[0]:
            raise ValueError(
                f"image_ids: expected one id per descriptor row ({np.shape(des)[0]}), got {ids.shape}"
            )
        if validate and ids.size and ids.min() < 0:
            raise ValueError(f"image_ids: expected non-negative ids, got minimum {ids.min()}")
        unique, internal = np.unique(ids, return_inverse=True)
        rows = np.asarray(des, np.float32)
    else:
        n, m = np.shape(des)[:2]
        if mask is not None and tuple(np.shape(mask)) != (n, m):
            raise ValueError(f"mask: expected shape {(n, m)} (N, M), got {np.shape(mask)}")
        if image_ids is None:
            unique = first_id + np.arange(n)
        else:
            check_ndim(image_ids, "image_ids", (1,), "one id per image (N,)")
            check_integer(image_ids, "image_ids")
            unique = np.asarray(image_ids)
            if unique.shape[0] != n:
                raise ValueError(f"image_ids: expected one id per image ({n}), got {unique.shape}")
            if validate and len(np.unique(unique)) != n:
                raise ValueError("image_ids: expected distinct ids, one per image")
        if mask is None:
            rows = np.asarray(des, np.float32).reshape(n * m, -1)
            internal = np.repeat(np.arange(n), m)
        else:
            keep = np.asarray(mask, bool)
            rows = np.asarray(des, np.float32)[keep]
            internal = np.nonzero(keep)[0]
    if validate:
        check_finite(rows, name)
    if unique.size and (unique.max() >= 2**31 or unique.min() < -(2**31)):
        raise ValueError("image_ids: ids must fit in int32")
    return rows, internal.astype(np.int64), unique.astype(np.int64)


@partial(jax.jit, static_argnames=("a", "binary", "asmk_compat"))
def _aggregate_step(rows, groups, valid, centroids, a, binary, asmk_compat):
    _, words = codebook.nearest(rows, centroids, a)
    return kernels.aggregate_flat(
        rows, words, groups, centroids, binary, valid, asmk_compat=asmk_compat
    )


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _aggregate(rows, groups, centroids, a: int, binary: bool, asmk_compat: bool, rows_per_step):
    """Aggregate flat rows per (group, word), a bounded number of rows at a time (host loop).

    Rows are sorted by group (unless they already are) and cut at group boundaries; each step is
    padded to a power of two (at least 1024 rows) so that few shapes are compiled. Returns numpy
    ``(groups, words, data)`` sorted by (group, word).
    """
    if np.any(np.diff(groups) < 0):
        order = np.argsort(groups, kind="stable")
        rows, groups = rows[order], groups[order]
    edges = np.concatenate([[0], np.flatnonzero(np.diff(groups)) + 1, [len(rows)]])
    out_g, out_w, out_d = [], [], []
    lo = 0
    while lo < len(rows):
        hi = edges[np.searchsorted(edges, lo + rows_per_step, side="right") - 1]
        if hi <= lo:
            hi = edges[np.searchsorted(edges, lo, side="right")]
        size = max(_next_pow2(hi - lo), _MIN_ROWS)
        valid = np.arange(size) < hi - lo
        pad = ((0, size - (hi - lo)), (0, 0))
        g, w, d, ok = _aggregate_step(
            jnp.asarray(np.pad(rows[lo:hi], pad)),
            jnp.asarray(np.pad(groups[lo:hi] - groups[lo], (0, size - (hi - lo))), jnp.int32),
            jnp.asarray(valid),
            centroids,
            a,
            binary,
            asmk_compat,
        )
        count = int(np.sum(np.asarray(ok)))
        out_g.append(np.asarray(g[:count]).astype(np.int64) + groups[lo])
        out_w.append(np.asarray(w[:count]))
        out_d.append(np.asarray(d[:count]))
        lo = hi
    if not out_g:
        width = -(-centroids.shape[1] // 32) if binary else centroids.shape[1]
        dtype = np.uint32 if binary else np.float32
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, width), dtype)
    return np.concatenate(out_g), np.concatenate(out_w), np.concatenate(out_d)


def _csr(k: int, images: np.ndarray, words: np.ndarray, data: np.ndarray):
    """Entries sorted by (word, image): ``offsets (k + 1,)``, images, data."""
    order = np.lexsort((images, words))
    offsets = np.searchsorted(words[order], np.arange(k + 1), side="left")
    return offsets, images[order], data[order]


def _check_centroids(centroids, validate: bool) -> None:
    check_ndim(centroids, "centroids", (2,), "a codebook (k, d)")
    check_floating(centroids, "centroids")
    if np.shape(centroids)[0] == 0:
        raise ValueError("centroids: expected at least one visual word")
    if validate:
        check_finite(centroids, "centroids")


def build(
    centroids: jax.Array,
    des: jax.Array,
    image_ids: jax.Array | None = None,
    kernel: str = "asmk",
    binary: bool = True,
    multiple_assignment: int = kernels.DATABASE_MA,
    use_idf: bool = False,
    *,
    mask: jax.Array | None = None,
    asmk_compat: bool = False,
    rows_per_step: int = DEFAULT_ROWS_PER_STEP,
    validate: bool = True,
) -> Index:
    """Build an ASMK★ (default) or ASMK inverted file over a database of local descriptors.

    Args:
      centroids: the codebook ``(k, d)`` (e.g. :func:`jret.codebook.kmeans`).
      des: flat descriptors ``(R, d)`` with ``image_ids (R,)``, or a padded batch ``(N, M, d)``
        with an optional ``mask (N, M)`` and optional distinct ``image_ids (N,)`` (default
        ``arange(N)``).
      image_ids: see ``des``; the ids :func:`search` returns.
      kernel: ``'asmk'`` (aggregated kernels only; see :mod:`jret.kernels` for the others).
      binary: ASMK★ (packed signs, default) or ASMK (ℓ2-normalised sums).
      multiple_assignment: database-side assignment (default 1).
      use_idf: squared-log IDF word weights (default False, as HOW).
      mask: validity of the padded descriptors.
      asmk_compat: binarise and compare like the asmk package: a zero component of a residual
        sum gives bit 0 (default: bit 1, the seed's rule) and the Hamming similarity is taken
        over d rounded up to a multiple of 32 (identical for d = 128; SPEC §14.1 #26–27).
      rows_per_step: descriptors quantised and aggregated per device call.
      validate: check values (NaN/inf, ids) first (default True).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS} (aggregated kernels), got {kernel!r}")
    _check_centroids(centroids, validate)
    a = check_positive_int(multiple_assignment, "multiple_assignment")
    if a > np.shape(centroids)[0]:
        raise ValueError(
            f"multiple_assignment: expected at most k = {np.shape(centroids)[0]}, got {a}"
        )
    check_positive_int(rows_per_step, "rows_per_step")
    if np.ndim(des) >= 1 and np.shape(des)[-1] != np.shape(centroids)[1]:
        raise ValueError(
            f"des: expected dimension {np.shape(centroids)[1]} (the codebook's), got {np.shape(des)}"
        )
    rows, internal, ids = _rows(des, image_ids, mask, "des", 0, validate)
    if len(ids) == 0:
        raise ValueError("des: expected at least one database image, got none")
    centroids = jnp.asarray(centroids, jnp.float32)
    groups, words, data = _aggregate(
        rows, internal, centroids, a, binary, asmk_compat, rows_per_step
    )
    offsets, images, data = _csr(centroids.shape[0], groups, words, data)
    d = centroids.shape[1]
    return _finalise(
        centroids,
        offsets,
        images,
        data,
        ids,
        binary=bool(binary),
        nbits=32 * -(-d // 32) if asmk_compat else d,
        use_idf=bool(use_idf),
        multiple_assignment=a,
        asmk_compat=bool(asmk_compat),
    )


def add(
    index: Index,
    des: jax.Array,
    image_ids: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    rows_per_step: int = DEFAULT_ROWS_PER_STEP,
    validate: bool = True,
) -> Index:
    """A new index with more database images (ids must be new); IDF and norms are recomputed,
    so ``add(build(A), B)`` equals ``build(A ∪ B)``. Padded input without ids continues the ids
    after the largest one in the index."""
    if np.ndim(des) >= 1 and np.shape(des)[-1] != index.centroids.shape[1]:
        raise ValueError(
            f"des: expected dimension {index.centroids.shape[1]} (the codebook's), got {np.shape(des)}"
        )
    old_ids = np.asarray(index.image_ids).astype(np.int64)
    first = int(old_ids.max()) + 1 if old_ids.size else 0
    rows, internal, ids = _rows(des, image_ids, mask, "des", first, validate)
    clash = np.intersect1d(ids, old_ids)
    if clash.size:
        raise ValueError(f"image_ids: already in the index: {clash[:10].tolist()}")
    groups, words, data = _aggregate(
        rows,
        internal,
        index.centroids,
        index.multiple_assignment,
        index.binary,
        index.asmk_compat,
        rows_per_step,
    )
    k = index.codebook_size
    old_words = np.repeat(np.arange(k), np.asarray(index.doc_freq))
    offsets, images, data = _csr(
        k,
        np.concatenate([np.asarray(index.entry_image, np.int64), groups + len(old_ids)]),
        np.concatenate([old_words, words]),
        np.concatenate([np.asarray(index.entry_data), data.astype(index.entry_data.dtype)]),
    )
    return _finalise(
        index.centroids,
        offsets,
        images,
        data,
        np.concatenate([old_ids, ids]),
        binary=index.binary,
        nbits=index.nbits,
        use_idf=index.use_idf,
        multiple_assignment=index.multiple_assignment,
        asmk_compat=index.asmk_compat,
    )


def _similarity(q: jax.Array, e: jax.Array, binary: bool, nbits: int) -> jax.Array:
    if binary:
        return kernels.hamming_similarity(q, e, nbits)
    return jnp.sum(q.astype(jnp.float32) * e.astype(jnp.float32), axis=-1)


@flax.struct.dataclass
class _Postings:
    """The CSR arrays that one device scores: the whole index, or one shard of its images."""

    offsets: jax.Array  # (k + 1,)
    entry_image: jax.Array  # (E,) image index within these postings
    entry_data: jax.Array  # (E, F)
    inv_norm: jax.Array  # (n,) norm[i]^(-1/2), 0 for images without entries


def _accumulate(
    postings: _Postings,
    weights: jax.Array,
    query: kernels.WordSet,
    alpha,
    tau,
    binary: bool,
    nbits: int,
    chunk: int,
    axis_name: str | None = None,
) -> jax.Array:
    """Unnormalised-by-query scores ``(B, n)`` of query sets ``(B, K)`` against the postings."""
    b, kq = query.words.shape
    n = postings.inv_norm.shape[0]
    w = jnp.where(query.mask, query.words, 0).reshape(-1)
    start = postings.offsets[w]
    length = jnp.where(query.mask.reshape(-1), postings.offsets[w + 1] - start, 0)
    end = jnp.cumsum(length)
    first = end - length
    total = end[-1]
    owner = jnp.repeat(jnp.arange(b, dtype=jnp.int32), kq)
    qdata = query.data.reshape(b * kq, -1)
    qweight = weights[w]

    def step(t, scores):
        p = t * chunk + jnp.arange(chunk, dtype=jnp.int32)
        task = jnp.minimum(jnp.searchsorted(end, p, side="right"), b * kq - 1)
        live = p < total
        e = jnp.where(live, start[task] + p - first[task], 0)
        img = postings.entry_image[e]
        sim = _similarity(qdata[task], postings.entry_data[e], binary, nbits)
        val = kernels.sigma_alpha(sim, alpha, tau) * qweight[task] * postings.inv_norm[img]
        return scores.at[owner[task] * n + img].add(jnp.where(live, val, 0.0))

    init = jnp.zeros(b * n, jnp.float32)
    if axis_name is not None:
        init = lax.pcast(init, (axis_name,), to="varying")
    steps = (total + chunk - 1) // chunk
    return lax.fori_loop(0, steps, step, init).reshape(b, n)


def _inv_sqrt(x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, lax.rsqrt(jnp.where(x > 0, x, 1.0)), 0.0)


def _query_scale(weights: jax.Array, query: kernels.WordSet) -> jax.Array:
    """``γ(Q) = (Σ_{c∈C_Q} w_c)^(−1/2)`` of query sets ``(B, K)`` (SPEC §6.2)."""
    w = weights[jnp.where(query.mask, query.words, 0)]
    return _inv_sqrt(jnp.sum(jnp.where(query.mask, w, 0.0), axis=1))


def _valid_queries(queries: kernels.WordSet, width: int) -> kernels.WordSet:
    """Check aggregated query sets ``(B, K)`` against the index's entry width; entries with a
    negative word become padding."""
    check_ndim(queries.words, "queries.words", (2,), "query words (B, K)")
    words, data = jnp.asarray(queries.words), jnp.asarray(queries.data)
    if data.shape != (*words.shape, width):
        raise ValueError(
            f"queries.data: expected shape {words.shape} + ({width},), got {data.shape}"
        )
    if np.shape(queries.mask) != words.shape:
        raise ValueError(
            f"queries.mask: expected shape {words.shape}, got {np.shape(queries.mask)}"
        )
    mask = jnp.asarray(queries.mask, bool) & (words >= 0)
    return kernels.WordSet(words=words, data=data, mask=mask)


def score_sets(
    index: Index,
    queries: kernels.WordSet,
    alpha: float = kernels.ALPHA,
    tau: float = kernels.TAU,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Scores ``(B, N)`` of aggregated query sets against every database image (jit-able).

    Args:
      index: the :class:`Index`.
      queries: a :class:`jret.kernels.WordSet` ``(B, K)`` in the index's format (from
        :func:`aggregate_queries`): one entry per word, ``data (B, K, F)``.
      alpha, tau: the selectivity σ_α (α = 3, τ = 0).
      chunk_size: postings visited per loop step (static).
    """
    query = _valid_queries(queries, index.entry_data.shape[1])
    postings = _Postings(index.offsets, index.entry_image, index.entry_data, _inv_sqrt(index.norm))
    chunk = check_positive_int(chunk_size, "chunk_size")
    scores = _accumulate(
        postings, index.weights, query, alpha, tau, index.binary, index.nbits, chunk
    )
    return scores * _query_scale(index.weights, query)[:, None]


def _rank(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k (or the full ranking when k = n) by decreasing score, ties to the lower index."""
    if k == scores.shape[1]:
        ids = jnp.argsort(-scores, axis=1, stable=True)
        return jnp.take_along_axis(scores, ids, 1), ids.astype(jnp.int32)
    return lax.top_k(scores, k)


@partial(jax.jit, static_argnames=("k", "chunk_size"))
def _search_block(index, query, alpha, tau, k, chunk_size):
    scores, ids = _rank(score_sets(index, query, alpha, tau, chunk_size), k)
    return scores, index.image_ids[ids]


def _split(index: Index, n_shards: int) -> tuple[_Postings, jax.Array]:
    """The index cut into ``n_shards`` contiguous image ranges: :class:`_Postings` stacked on a
    leading axis ``(S, …)`` (entries padded to the longest shard) and the images of each
    ``(S,)``."""
    n_local = -(-index.n_images // n_shards)
    k = index.codebook_size
    words = np.repeat(np.arange(k), np.asarray(index.doc_freq))
    images = np.asarray(index.entry_image)
    data = np.asarray(index.entry_data)
    inv = np.asarray(_inv_sqrt(index.norm))
    shard = images // n_local
    e_max = max(1, int(np.bincount(shard, minlength=n_shards).max()) if images.size else 1)
    offsets = np.zeros((n_shards, k + 1), np.int32)
    ent_img = np.zeros((n_shards, e_max), np.int32)
    ent_data = np.zeros((n_shards, e_max, data.shape[1]), data.dtype)
    inv_norm = np.zeros((n_shards, n_local), np.float32)
    for s in range(n_shards):
        sel = shard == s
        offsets[s] = np.searchsorted(words[sel], np.arange(k + 1), side="left")
        ent_img[s, : sel.sum()] = images[sel] - s * n_local
        ent_data[s, : sel.sum()] = data[sel]
        part = inv[s * n_local : (s + 1) * n_local]
        inv_norm[s, : len(part)] = part
    n_valid = np.clip(index.n_images - n_local * np.arange(n_shards), 0, n_local).astype(np.int32)
    postings = _Postings(*(jnp.asarray(x) for x in (offsets, ent_img, ent_data, inv_norm)))
    return postings, jnp.asarray(n_valid)


@partial(jax.jit, static_argnames=("k", "chunk_size", "mesh", "axis_name"))
def _search_sharded(index, shards, n_valid, query, alpha, tau, k, chunk_size, mesh, axis_name):
    n_local = shards.inv_norm.shape[1]
    k_local = min(k, n_local)

    def local(postings: _Postings, n_valid, weights, query, q_inv):
        postings = jax.tree.map(lambda x: x[0], postings)
        scores = _accumulate(
            postings, weights, query, alpha, tau, index.binary, index.nbits, chunk_size, axis_name
        )
        scores = jnp.where(jnp.arange(n_local) < n_valid[0], scores * q_inv[:, None], -jnp.inf)
        best, ids = _rank(scores, k_local)
        ids = ids + lax.axis_index(axis_name) * n_local
        best = lax.all_gather(best, axis_name, axis=1, tiled=True, to="invarying")
        ids = lax.all_gather(ids, axis_name, axis=1, tiled=True, to="invarying")
        top, pos = lax.top_k(best, k)
        return top, jnp.take_along_axis(ids, pos, 1)

    spec = jax.tree.map(lambda _: P(axis_name), shards)
    scores, ids = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, P(axis_name), P(), P(), P()),
        out_specs=(P(), P()),
    )(shards, n_valid, index.weights, query, _query_scale(index.weights, query))
    return scores, index.image_ids[ids]


def search_sets(
    index: Index,
    queries: kernels.WordSet,
    k: int | None = None,
    alpha: float = kernels.ALPHA,
    tau: float = kernels.TAU,
    query_batch: int = DEFAULT_QUERY_BATCH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh | None = None,
    axis_name: str = "db",
) -> tuple[jax.Array, jax.Array]:
    """:func:`search` for queries that are already aggregated: a :class:`jret.kernels.WordSet`
    ``(nq, K)`` from :func:`aggregate_queries`, or an expanded query of :func:`jret.hqe.hqe`.

    Returns ``scores (nq, k)`` float32 decreasing and ``ids (nq, k)`` int32 database image ids.
    """
    n = index.n_images
    k = n if k is None else check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"k: expected at most the number of database images {n}, got {k}")
    batch = check_positive_int(query_batch, "query_batch")
    queries = _valid_queries(queries, index.entry_data.shape[1])
    nq = queries.words.shape[0]
    if nq == 0:
        return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
    if mesh is not None:
        if axis_name not in mesh.shape:
            raise ValueError(
                f"axis_name: {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}"
            )
        shards, n_valid = _split(index, mesh.shape[axis_name])
    size = min(batch, nq)  # queries per device call, the last call padded with empty sets
    padded = jax.tree.map(
        lambda x: jnp.pad(x, [(0, -nq % size)] + [(0, 0)] * (x.ndim - 1)), queries
    )
    out_s, out_i = [], []
    for lo in range(0, nq, size):
        query = jax.tree.map(lambda x, lo=lo: x[lo : lo + size], padded)
        if mesh is None:
            s, i = _search_block(index, query, alpha, tau, k, chunk_size)
        else:
            s, i = _search_sharded(
                index, shards, n_valid, query, alpha, tau, k, chunk_size, mesh, axis_name
            )
        out_s.append(s)
        out_i.append(i)
    return jnp.concatenate(out_s)[:nq], jnp.concatenate(out_i)[:nq]


def aggregate_queries(
    index: Index,
    des: jax.Array,
    image_ids: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    multiple_assignment: int = kernels.QUERY_MA,
    rows_per_step: int = DEFAULT_ROWS_PER_STEP,
    validate: bool = True,
) -> tuple[kernels.WordSet, np.ndarray]:
    """Quantise (MA) and aggregate query images in the index's format.

    Returns a padded :class:`jret.kernels.WordSet` ``(nq, K)`` (K rounded up to a multiple of 32)
    and the query image ids ``(nq,)``: sorted distinct ids for flat input, rows for padded input.
    """
    if np.ndim(des) >= 1 and np.shape(des)[-1] != index.centroids.shape[1]:
        raise ValueError(
            f"des: expected dimension {index.centroids.shape[1]} (the codebook's), got {np.shape(des)}"
        )
    a = check_positive_int(multiple_assignment, "multiple_assignment")
    if a > index.codebook_size:
        raise ValueError(
            f"multiple_assignment: expected at most k = {index.codebook_size}, got {a}"
        )
    rows, internal, ids = _rows(des, image_ids, mask, "des", 0, validate)
    groups, words, data = _aggregate(
        rows, internal, index.centroids, a, index.binary, index.asmk_compat, rows_per_step
    )
    nq = len(ids)
    counts = np.bincount(groups, minlength=nq)
    slots = max(_SLOT_MULTIPLE, -(-int(counts.max(initial=0)) // _SLOT_MULTIPLE) * _SLOT_MULTIPLE)
    pos = np.arange(len(groups)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[groups]
    out_w = np.full((nq, slots), -1, np.int32)
    out_d = np.zeros((nq, slots, data.shape[1]), data.dtype)
    out_w[groups, pos] = words
    out_d[groups, pos] = data
    return (
        kernels.WordSet(
            words=jnp.asarray(out_w), data=jnp.asarray(out_d), mask=jnp.asarray(out_w >= 0)
        ),
        ids,
    )


def search(
    index: Index,
    des: jax.Array,
    image_ids: jax.Array | None = None,
    k: int | None = None,
    alpha: float = kernels.ALPHA,
    tau: float = kernels.TAU,
    multiple_assignment: int = kernels.QUERY_MA,
    *,
    mask: jax.Array | None = None,
    query_batch: int = DEFAULT_QUERY_BATCH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh | None = None,
    axis_name: str = "db",
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Rank the database for each query image with ASMK / ASMK★ (HOW defaults: MA 5, α 3, τ 0).

    Args:
      index: from :func:`build`.
      des: flat query descriptors ``(R, d)`` with ``image_ids (R,)``, or a padded batch
        ``(nq, M, d)`` with an optional ``mask (nq, M)``.
      image_ids: query image id per row (flat input); the output rows follow the sorted distinct
        ids. With padded input the output rows are the batch rows and ids are not needed.
      k: results per query (default: all database images, the full ranking).
      alpha, tau: selectivity (α = 3, τ = 0).
      multiple_assignment: query-side assignment (default 5).
      mask: validity of padded query descriptors.
      query_batch: queries scored per device call (their score rows are dense, ``batch × N``).
      chunk_size: postings visited per loop step.
      mesh, axis_name: shard the database images over this mesh axis (optional).
      validate: check values first (default True).

    Returns ``scores (nq, k)`` float32 decreasing and ``ids (nq, k)`` int32 database image ids;
    equal scores keep the lower internal index (insertion order) first.
    """
    queries, _ = aggregate_queries(
        index, des, image_ids, mask=mask, multiple_assignment=multiple_assignment, validate=validate
    )
    return search_sets(index, queries, k, alpha, tau, query_batch, chunk_size, mesh, axis_name)


def image_sets(index: Index, images: jax.Array, slots: int | None = None) -> kernels.WordSet:
    """The indexed aggregated sets of database images (by internal index), padded ``(n, K)``.

    ``K = slots`` when given (at least the largest set), else the largest set rounded up to 32.
    """
    images = np.asarray(images, np.int64).reshape(-1)
    if images.size and (images.min() < 0 or images.max() >= index.n_images):
        raise ValueError(f"images: expected internal indices in [0, {index.n_images})")
    ent_img = np.asarray(index.entry_image)
    order = np.argsort(ent_img, kind="stable")
    words = np.repeat(np.arange(index.codebook_size), np.asarray(index.doc_freq))[order]
    data = np.asarray(index.entry_data)[order]
    lo = np.searchsorted(ent_img[order], images, side="left")
    hi = np.searchsorted(ent_img[order], images, side="right")
    longest = int((hi - lo).max(initial=0))
    if slots is None:
        slots = max(_SLOT_MULTIPLE, -(-longest // _SLOT_MULTIPLE) * _SLOT_MULTIPLE)
    elif slots < longest:
        raise ValueError(f"slots: expected at least {longest} (the largest set), got {slots}")
    out_w = np.full((len(images), slots), -1, np.int32)
    out_d = np.zeros((len(images), slots, data.shape[1]), data.dtype)
    for j, (a, b) in enumerate(zip(lo, hi, strict=True)):
        out_w[j, : b - a] = words[a:b]
        out_d[j, : b - a] = data[a:b]
    return kernels.WordSet(
        words=jnp.asarray(out_w), data=jnp.asarray(out_d), mask=jnp.asarray(out_w >= 0)
    )


def stats(index: Index) -> dict[str, Any]:
    """Index statistics: sizes, entries per word and image, imbalance factor, memory in bytes.

    The imbalance factor ``k Σ n_c² / (Σ n_c)²`` is 1 for perfectly balanced lists
    ([000] L21506–21631); ``bytes`` counts the entry payloads, image ids and offsets.
    """
    counts = np.asarray(index.doc_freq, np.float64)
    total = counts.sum()
    n = index.n_images
    nbytes = sum(
        int(np.asarray(x).nbytes) for x in (index.entry_data, index.entry_image, index.offsets)
    )
    return {
        "images": n,
        "entries": int(total),
        "vectors_per_image": float(total / n) if n else 0.0,
        "mean_entries_per_word": float(counts.mean()),
        "min_entries_per_word": int(counts.min()),
        "max_entries_per_word": int(counts.max()),
        "std_entries_per_word": float(counts.std()),
        "empty_words": int((counts == 0).sum()),
        "imbalance_factor": float(len(counts) * (counts**2).sum() / (total**2 or 1.0)),
        "bytes": nbytes,
        "bytes_per_image": nbytes / n if n else 0.0,
        "binary": index.binary,
        "use_idf": index.use_idf,
    }


def save(index: Index, path: str | os.PathLike) -> None:
    """Write the index to ``path`` (``.npz``) atomically: a temporary file, then ``os.replace``."""
    path = os.fspath(path)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "binary": index.binary,
        "nbits": index.nbits,
        "use_idf": index.use_idf,
        "multiple_assignment": index.multiple_assignment,
        "asmk_compat": index.asmk_compat,
        "kernel": "asmk",
    }
    arrays = {name: np.asarray(getattr(index, name)) for name in _ARRAYS}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ivf-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.asarray(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _validate_loaded(path: str, arrays: dict[str, np.ndarray]) -> None:
    offsets, images = arrays["offsets"], arrays["entry_image"]
    k = arrays["centroids"].shape[0]
    problems = []
    if offsets.shape != (k + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        problems.append("offsets are not a valid CSR index over the codebook")
    elif offsets[-1] != images.shape[0] or arrays["entry_data"].shape[0] != images.shape[0]:
        problems.append("entry arrays do not match the offsets")
    elif images.size and (images.min() < 0 or images.max() >= arrays["image_ids"].shape[0]):
        problems.append("entry images out of range")
    if problems:
        raise ValueError(f"{path}: corrupt index ({'; '.join(problems)})")


def load(path: str | os.PathLike) -> Index:
    """Read an index written by :func:`save`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it is
    not a jret index, has another format version, or is inconsistent.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: index file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path}: not a readable jret index ({type(e).__name__}: {e})") from e
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a jret index (no valid metadata)") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a jret index (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: index format version {meta.get('version')!r}, this jret reads version {VERSION}"
        )
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"{path}: corrupt index (missing arrays: {', '.join(missing)})")
    _validate_loaded(path, arrays)
    return _finalise(
        arrays["centroids"],
        arrays["offsets"],
        arrays["entry_image"],
        arrays["entry_data"],
        arrays["image_ids"],
        binary=bool(meta["binary"]),
        nbits=int(meta["nbits"]),
        use_idf=bool(meta["use_idf"]),
        multiple_assignment=int(meta["multiple_assignment"]),
        asmk_compat=bool(meta["asmk_compat"]),
    )
