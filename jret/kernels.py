"""Match kernels on visual words: BoW, Hamming Embedding, SMK, ASMK and the binary SMK★ / ASMK★.

Framework (Tolias, Avrithis & Jégou, "Image search with selective match kernels: aggregation
across single and multiple images", IJCV 2016, eq. 2–3, [000] L6841–6873; SPEC §6.2–6.5)::

    K(X, Y) = γ(X) γ(Y) Σ_c w_c M(X_c, Y_c),    γ(X) = (Σ_c w_c M(X_c, X_c))^(−1/2)

with ``X_c`` the descriptors of X assigned to word c and ``w_c`` a per-word weight (1, or an IDF).
Non-aggregated kernels sum over descriptor pairs of a word, ``M = Σ_x Σ_y σ(φ(x)ᵀφ(y))``; aggregated
ones match one vector per word, ``M = σ(Φ(X_c)ᵀΦ(Y_c))``. The selectivity is
``σ_α(u) = sign(u)|u|^α`` for ``u ≥ τ``, else 0 (eq. 18; α = 3, τ = 0).

===========  ===================================  =========================================
kernel       entries (one :class:`WordSet` row)    per-pair similarity
===========  ===================================  =========================================
BoW          a descriptor–word pair               1
HE           + its B-bit HE code                   exp(−h²/σ²) if h ≤ h_t (B = 64, h_t = 24,
                                                   σ = 16, with burstiness normalisation)
SMK          + its ℓ2-normalised residual r̂        σ_α(r̂ᵀr̂')
SMK★         + the signs of its residual           σ_α(1 − 2h/B)
ASMK         one per word: l2n(Σ r)                σ_α(·), γ = (Σ_{c∈C_X} w_c)^(−1/2)
ASMK★        one per word: signs of Σ r            σ_α(1 − 2h/B), same γ
===========  ===================================  =========================================

Binarisation follows HOW and the ``asmk`` package by default (SPEC §6.5): signs of the plain
residual sums; with a :class:`HammingEmbedding` the IJCV variant is used instead: descriptors are
projected by a random rotation and compared to per-word medians (as in HE). A component that is
exactly zero gives bit 1 (the seed's ``b(x) = +1 if x ≥ 0``, [000] L7340–7345), or bit 0 with
``asmk_compat=True`` as in the ``asmk`` package (SPEC §14.1 #26). Codes are packed in uint32 words,
bit ``i`` of word ``j`` holding dimension ``32 j + i``.

Sets are padded: a :class:`WordSet` holds ``words (P,)`` (−1 on padding), ``data (P, F)`` and
``mask (P,)``; a leading image axis ``(N, P, …)`` is handled by ``vmap`` (:func:`pairwise`). Multiple
assignment simply gives more entries per descriptor: ``A = 5`` on the query side, 1 on the
database side ([000] L7540–7543, [003] L163).
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jret._checks import (
    check_finite,
    check_floating,
    check_integer,
    check_ndim,
    check_positive_int,
)
from jret.normalize import l2n

ALPHA = 3.0
TAU = 0.0
QUERY_MA = 5
DATABASE_MA = 1
HE_BITS = 64
HE_THRESHOLD = 24
HE_SIGMA = 16.0
IDF_VARIANTS = ("log", "log2")


@flax.struct.dataclass
class WordSet:
    """Padded entries of one image ``(P, …)`` or a batch ``(N, P, …)``.

    Attributes:
      words: ``(..., P)`` int32 visual words, −1 on padding.
      data: ``(..., P, F)`` per-entry payload: float vectors, uint32 packed codes, or ``F = 0``.
      mask: ``(..., P)`` bool, True for real entries.
    """

    words: jax.Array
    data: jax.Array
    mask: jax.Array


@flax.struct.dataclass
class HammingEmbedding:
    """Hamming Embedding parameters (Jégou et al., ECCV 2008; SPEC §6.3).

    Attributes:
      projection: ``(B, d)`` the first B rows of a random rotation of R^d.
      medians: ``(k, B)`` per-word median of each projected component.
    """

    projection: jax.Array
    medians: jax.Array

    @property
    def nbits(self) -> int:
        return self.projection.shape[0]


def sigma_alpha(u: jax.Array, alpha: float = ALPHA, tau: float = TAU) -> jax.Array:
    """Selectivity ``σ_α(u) = sign(u)|u|^α`` if ``u ≥ τ`` else 0 ([000] L7180–7200, eq. 18).

    α = 3, τ = 0 by default. The seed writes ``u > τ``; jret keeps ``u ≥ τ`` like the asmk package
    (SPEC §6.4), which differs only at ``u = τ`` exactly.
    """
    u = jnp.asarray(u)
    return jnp.where(u >= tau, jnp.sign(u) * jnp.abs(u) ** alpha, 0.0)


def pack_bits(bits: jax.Array) -> jax.Array:
    """Pack booleans ``(..., B)`` into uint32 ``(..., ⌈B/32⌉)``: bit i of word j is 32 j + i."""
    bits = jnp.asarray(bits, bool)
    n = bits.shape[-1]
    words = -(-n // 32)
    padded = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, 32 * words - n)])
    padded = padded.reshape(*bits.shape[:-1], words, 32).astype(jnp.uint32)
    return jnp.sum(padded << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(codes: jax.Array, nbits: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: uint32 ``(..., W)`` to booleans ``(..., nbits)``."""
    codes = jnp.asarray(codes, jnp.uint32)
    bits = (codes[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(*codes.shape[:-1], -1)[..., :nbits].astype(bool)


def binarize(z: jax.Array, asmk_compat: bool = False) -> jax.Array:
    """Packed signs of ``z (..., d)``: bit 1 where ``z ≥ 0`` (the IJCV rule ``b(x) = +1 if x ≥ 0``,
    [000] L7340–7345; default) or where ``z > 0`` (``asmk_compat=True``, the asmk package).

    Returns uint32 ``(..., ⌈d/32⌉)``.
    """
    z = jnp.asarray(z)
    return pack_bits(z > 0 if asmk_compat else z >= 0)


def hamming_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Hamming distance of packed codes ``(..., W)`` (broadcasting): ``Σ popcount(a xor b)``."""
    x = jnp.bitwise_xor(jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32))
    return jnp.sum(lax.population_count(x).astype(jnp.int32), axis=-1)


def hamming_similarity(a: jax.Array, b: jax.Array, nbits: int) -> jax.Array:
    """Hamming inner product ``b̂ᵀb̂' = 1 − 2h/B`` ∈ [−1, 1] ([000] L6918–6932, eq. 7)."""
    return 1.0 - 2.0 * hamming_distance(a, b).astype(jnp.float32) / nbits


def he_weight(h: jax.Array, ht: int = HE_THRESHOLD, sigma: float = HE_SIGMA) -> jax.Array:
    """HE vote weight ``exp(−h²/σ²)`` if ``h ≤ h_t`` else 0 ([000] L6918–6932, eq. 6)."""
    h = jnp.asarray(h, jnp.float32)
    return jnp.where(h <= ht, jnp.exp(-(h**2) / sigma**2), 0.0)


def _median_by_word(z: jax.Array, words: jax.Array, k: int) -> jax.Array:
    """Per-word median ``(k,)`` of values ``z (n,)`` (mean of the two middle values; 0 if empty)."""
    order = jnp.lexsort((z, words))
    zs, ws = z[order], words[order]
    first = jnp.searchsorted(ws, jnp.arange(k), side="left")
    count = jnp.searchsorted(ws, jnp.arange(k), side="right") - first
    lo = jnp.clip(first + (count - 1) // 2, 0, z.shape[0] - 1)
    hi = jnp.clip(first + count // 2, 0, z.shape[0] - 1)
    return jnp.where(count > 0, (zs[lo] + zs[hi]) / 2, 0.0)


@partial(jax.jit, static_argnames=("k", "nbits"))
def _he_learn(key, des, words, k: int, nbits: int) -> HammingEmbedding:
    d = des.shape[1]
    q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), jnp.float32))
    projection = (q * jnp.sign(jnp.diag(r)))[:, :nbits].T
    z = des @ projection.T
    medians = jax.vmap(lambda col: _median_by_word(col, words, k), in_axes=1, out_axes=1)(z)
    return HammingEmbedding(projection=projection, medians=medians)


def he_learn(
    key: jax.Array,
    des: jax.Array,
    words: jax.Array,
    k: int,
    nbits: int = HE_BITS,
    validate: bool = True,
) -> HammingEmbedding:
    """Learn HE: a random orthogonal projection to ``nbits`` dimensions and per-word medians.

    Jégou, Douze & Schmid, ECCV 2008 ([000] L6900–6944, L21036–21064; SPEC §6.3): the projection
    is the first B rows of a random rotation (QR of a Gaussian matrix, from ``key``); the medians
    are taken per visual word over the projected training descriptors (an independent set).

    Args:
      des: training descriptors ``(n, d)``.
      words: their visual words ``(n,)`` or ``(n, 1)`` (single assignment).
      k: the codebook size.
      nbits: B, at most d (default 64, the HQE paper).
    """
    check_ndim(des, "des", (2,), "descriptors (n, d)")
    check_floating(des, "des")
    check_ndim(words, "words", (1, 2), "word ids (n,) or (n, 1)")
    check_integer(words, "words")
    k = check_positive_int(k, "k")
    nbits = check_positive_int(nbits, "nbits")
    words = jnp.reshape(jnp.asarray(words), (-1,))
    if words.shape[0] != des.shape[0]:
        raise ValueError(
            f"words: expected one word per descriptor ({des.shape[0]}), got {words.shape}"
        )
    if nbits > des.shape[1]:
        raise ValueError(
            f"nbits: expected at most the descriptor dimension {des.shape[1]}, got {nbits}"
        )
    if validate:
        check_finite(des, "des")
        w = np.asarray(words)
        if w.size and (w.min() < 0 or w.max() >= k):
            raise ValueError(f"words: expected ids in [0, {k}), got range [{w.min()}, {w.max()}]")
    return _he_learn(key, jnp.asarray(des, jnp.float32), words.astype(jnp.int32), k, nbits)


def _safe(words: jax.Array) -> jax.Array:
    return jnp.maximum(words, 0)


@jax.jit
def he_encode(des: jax.Array, words: jax.Array, he: HammingEmbedding) -> jax.Array:
    """HE codes ``(..., A, ⌈B/32⌉)`` of descriptors ``(..., d)`` for each of their words ``(..., A)``.

    Bit i is 1 when the i-th projected component exceeds the word's median (``≥``, IJCV rule).
    """
    check_floating(des, "des")
    z = jnp.asarray(des, jnp.float32) @ he.projection.T
    return binarize(z[..., None, :] - he.medians[_safe(words)])


def _entry_residuals(des, words, centroids, he: HammingEmbedding | None) -> jax.Array:
    """Per-entry residuals ``(..., A, F)``: ``x − c`` or, with HE, ``P x − median_c``."""
    des = jnp.asarray(des, jnp.float32)
    if he is None:
        return des[..., None, :] - centroids[_safe(words)]
    return (des @ he.projection.T)[..., None, :] - he.medians[_safe(words)]


def segment_aggregate(
    groups: jax.Array, words: jax.Array, vectors: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sum ``vectors (E, F)`` per distinct (group, word) key among the ``valid (E,)`` entries.

    Entries are sorted by (group, word) and summed with ``segment_sum``. Returns ``(groups (E,),
    words (E,), sums (E, F), mask (E,))`` with the distinct keys first, in increasing order; the
    remaining rows are padding (mask False, ids −1). Static shapes: jit- and vmap-able.
    """
    e = words.shape[0]
    order = jnp.lexsort((words, groups, ~valid))
    g, w, v = groups[order], words[order], valid[order]
    prev_g = jnp.concatenate([jnp.full((1,), -1, g.dtype), g[:-1]])
    prev_w = jnp.concatenate([jnp.full((1,), -1, w.dtype), w[:-1]])
    new = v & ((g != prev_g) | (w != prev_w))
    seg = jnp.where(v, jnp.cumsum(new) - 1, e)
    sums = jax.ops.segment_sum(vectors[order], seg, num_segments=e)
    out_g = jnp.full((e,), -1, jnp.int32).at[seg].set(g.astype(jnp.int32), mode="drop")
    out_w = jnp.full((e,), -1, jnp.int32).at[seg].set(w.astype(jnp.int32), mode="drop")
    return out_g, out_w, sums, jnp.arange(e) < jnp.sum(new)


def _finish(sums: jax.Array, binary: bool, asmk_compat: bool) -> jax.Array:
    return binarize(sums, asmk_compat) if binary else l2n(sums)


def aggregate_flat(
    des: jax.Array,
    words: jax.Array,
    groups: jax.Array,
    centroids: jax.Array,
    binary: bool = True,
    valid: jax.Array | None = None,
    he: HammingEmbedding | None = None,
    asmk_compat: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """ASMK / ASMK★ aggregation of flat descriptors ``(R, d)`` with a group (image) id each.

    Multiple assignment replicates first: each of the A words of a descriptor receives its
    residual from that word's centroid, then residuals are summed per (image, word)
    ([000] L7240–7266, L7568–7573). ASMK stores ``V̂ = l2n(Σ r)``, ASMK★ the packed signs of Σ r
    (or of ``Σ (P x − median_c)`` with ``he``, IJCV eq. 24).

    Args:
      des: ``(R, d)`` descriptors; ``words``: ``(R, A)`` their words; ``groups``: ``(R,)`` ids.
      centroids: ``(k, d)``.
      binary: ASMK★ (True, default) or ASMK.
      valid: optional ``(R,)`` bool; invalid rows and words −1 are ignored.
      he: optional :class:`HammingEmbedding` for the IJCV binarisation.
      asmk_compat: a zero component of Σ r gives bit 0, as the asmk package (default: bit 1).

    Returns ``(groups (R·A,), words (R·A,), data (R·A, F), mask (R·A,))``, distinct (group, word)
    keys first in increasing order (see :func:`segment_aggregate`).
    """
    r, a = words.shape
    ok = words >= 0 if valid is None else (words >= 0) & jnp.asarray(valid, bool)[:, None]
    res = _entry_residuals(des, words, centroids, he)
    rep = jnp.broadcast_to(jnp.asarray(groups)[:, None], (r, a))
    g, w, sums, mask = segment_aggregate(
        rep.reshape(-1), words.reshape(-1), res.reshape(r * a, -1), ok.reshape(-1)
    )
    return g, w, _finish(sums, binary, asmk_compat), mask


def _check_set(des, mask, words, centroids) -> None:
    check_ndim(des, "des", (2, 3), "a padded set (M, d) or a batch (N, M, d)")
    check_floating(des, "des")
    check_integer(words, "words")
    if tuple(np.shape(words)[:-1]) != tuple(np.shape(des)[:-1]) or np.ndim(words) != np.ndim(des):
        raise ValueError(
            f"words: expected shape {np.shape(des)[:-1]} + (A,), got {np.shape(words)}"
        )
    if mask is not None and tuple(np.shape(mask)) != tuple(np.shape(des)[:-1]):
        raise ValueError(f"mask: expected shape {np.shape(des)[:-1]}, got {np.shape(mask)}")
    if centroids is not None and np.shape(centroids)[-1] != np.shape(des)[-1]:
        raise ValueError(
            f"centroids: expected (k, {np.shape(des)[-1]}) to match des, got {np.shape(centroids)}"
        )


def _over_images(fn, des, *args):
    """Apply a per-image function to ``(M, …)`` or vmap it over a batch ``(N, M, …)``."""
    return fn(des, *args) if des.ndim == 2 else jax.vmap(fn)(des, *args)


@partial(jax.jit, static_argnames=("binary", "asmk_compat"))
def aggregate(
    des: jax.Array,
    mask: jax.Array | None,
    words: jax.Array,
    centroids: jax.Array,
    binary: bool = True,
    he: HammingEmbedding | None = None,
    asmk_compat: bool = False,
) -> WordSet:
    """Per-image ASMK (``binary=False``) / ASMK★ (default) aggregation of a padded set.

    Args:
      des: ``(M, d)`` or a batch ``(N, M, d)``; ``mask``: ``(M,)`` / ``(N, M)`` or None.
      words: ``(M, A)`` / ``(N, M, A)`` from :func:`jret.codebook.quantize` (−1 = none).
      centroids: ``(k, d)``.
      he: optional :class:`HammingEmbedding` (IJCV binarisation).
      asmk_compat: a zero component of Σ r gives bit 0, as the asmk package (default: bit 1).

    Returns a :class:`WordSet` of ``M·A`` slots per image, one entry per distinct word (sorted),
    ``data`` = ``l2n(Σ r)`` (float32 ``(…, d)``) or packed signs (uint32 ``(…, ⌈B/32⌉)``).
    """
    _check_set(des, mask, words, centroids)
    centroids = jnp.asarray(centroids, jnp.float32)

    def one(d, w, m):
        _, ws, data, ok = aggregate_flat(
            d, w, jnp.zeros(w.shape[0], jnp.int32), centroids, binary, m, he, asmk_compat
        )
        return WordSet(words=ws, data=data, mask=ok)

    valid = jnp.ones(np.shape(des)[:-1], bool) if mask is None else jnp.asarray(mask, bool)
    return _over_images(one, jnp.asarray(des), jnp.asarray(words), valid)


@partial(jax.jit, static_argnames=("kernel", "binary"))
def replicate(
    des: jax.Array,
    mask: jax.Array | None,
    words: jax.Array,
    centroids: jax.Array | None = None,
    kernel: str = "smk",
    binary: bool = False,
    he: HammingEmbedding | None = None,
) -> WordSet:
    """Entries of the non-aggregated kernels: one per (descriptor, assigned word) pair.

    ``kernel='bow'``: no payload; ``'he'``: HE codes (needs ``he``); ``'smk'``: the normalised
    residual ``r̂ = l2n(x − c)`` (SMK), or with ``binary`` its packed signs (SMK★, or HE-style
    codes when ``he`` is given, [000] L7300–7322).

    Returns a :class:`WordSet` with ``M·A`` entries per image (``(N, M·A, …)`` for a batch).
    """
    if kernel not in ("bow", "he", "smk"):
        raise ValueError(f"kernel: expected 'bow', 'he' or 'smk', got {kernel!r}")
    if kernel == "he" and he is None:
        raise ValueError("he: the 'he' kernel needs a HammingEmbedding (see he_learn)")
    if kernel == "smk" and centroids is None and not (binary and he is not None):
        raise ValueError("centroids: the 'smk' kernel needs the codebook for residuals")
    _check_set(des, mask, words, centroids)

    def one(d, w, m):
        ok = (w >= 0) & m[:, None]
        if kernel == "bow":
            data = jnp.zeros((*w.shape, 0), jnp.float32)
        elif kernel == "he" or (binary and he is not None):
            data = he_encode(d, w, he)
        else:
            res = _entry_residuals(d, w, jnp.asarray(centroids, jnp.float32), None)
            data = binarize(res) if binary else l2n(res)
        p = w.shape[0] * w.shape[1]
        return WordSet(
            words=jnp.where(ok, w, -1).reshape(p),
            data=data.reshape(p, -1),
            mask=ok.reshape(p),
        )

    valid = jnp.ones(np.shape(des)[:-1], bool) if mask is None else jnp.asarray(mask, bool)
    return _over_images(one, jnp.asarray(des), jnp.asarray(words), valid)


@partial(jax.jit, static_argnames=("k",))
def document_frequency(sets: WordSet, k: int) -> jax.Array:
    """Number of images ``(k,)`` whose set contains each word, from a batch ``(N, P)``."""
    words = jnp.where(sets.mask, sets.words, k)

    def present(w):
        return jnp.zeros((k + 1,), bool).at[w].set(True)[:k]

    return jnp.sum(jax.vmap(present)(words), axis=0, dtype=jnp.int32)


def idf_weights(doc_freq: jax.Array, n_images: int, variant: str = "log2") -> jax.Array:
    """Per-word IDF weights ``w_c`` from document frequencies ``(k,)`` (SPEC §6.2).

    ``'log'``: ``log(N / n_c)``; ``'log2'`` (the asmk package and MATLAB ASMK★): ``log(N / n_c)²``.
    Words in no image get weight 1 (the asmk package's convention).
    """
    if variant not in IDF_VARIANTS:
        raise ValueError(f"variant: expected one of {IDF_VARIANTS}, got {variant!r}")
    df = jnp.asarray(doc_freq, jnp.float32)
    w = jnp.log(n_images / jnp.maximum(df, 1.0))
    w = w**2 if variant == "log2" else w
    return jnp.where(df > 0, w, 1.0).astype(jnp.float32)


def _pair_matrix(x: WordSet, y: WordSet) -> jax.Array:
    """``(P, Q)`` True where entries share a word (both real)."""
    return (x.words[:, None] == y.words[None, :]) & x.mask[:, None] & y.mask[None, :]


def _entry_similarity(x: WordSet, y: WordSet, binary: bool, nbits: int | None) -> jax.Array:
    """``(P, Q)`` similarity of the payloads: ``1 − 2h/B`` for codes, the dot product otherwise."""
    if binary:
        bits = 32 * x.data.shape[-1] if nbits is None else nbits
        return hamming_similarity(x.data[:, None, :], y.data[None, :, :], bits)
    return jnp.einsum("pf,qf->pq", x.data.astype(jnp.float32), y.data.astype(jnp.float32))


def _word_weights(x: WordSet, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.ones(x.words.shape, jnp.float32)
    return jnp.asarray(weights, jnp.float32)[_safe(x.words)]


def _raw(x: WordSet, y: WordSet, pair: jax.Array, weights, burst: bool) -> jax.Array:
    """``Σ_c w_c Σ_{x∈X_c} [#Y_c(x)]^(−1/2 if burst) Σ_{y∈Y_c} s(x, y)`` for pair scores ``(P, Q)``."""
    pair = jnp.where(_pair_matrix(x, y), pair, 0.0)
    per_x = jnp.sum(pair, axis=1)
    if burst:
        per_x = per_x / jnp.sqrt(jnp.maximum(jnp.sum(pair != 0, axis=1), 1).astype(jnp.float32))
    return jnp.sum(_word_weights(x, weights) * per_x)


def _normalised(raw_xy, raw_xx, raw_yy) -> jax.Array:
    den = raw_xx * raw_yy
    return jnp.where(den > 0, raw_xy / jnp.sqrt(jnp.where(den > 0, den, 1.0)), 0.0)


@jax.jit
def bow(x: WordSet, y: WordSet, weights: jax.Array | None = None) -> jax.Array:
    """Bag-of-words cosine as a match kernel: ``M = #X_c · #Y_c`` ([000] L6880–6898, eq. 4)."""

    def raw(a, b):
        return _raw(a, b, jnp.ones((a.words.shape[0], b.words.shape[0])), weights, False)

    return _normalised(raw(x, y), raw(x, x), raw(y, y))


@partial(jax.jit, static_argnames=("burst",))
def he(
    x: WordSet,
    y: WordSet,
    ht: int = HE_THRESHOLD,
    sigma: float = HE_SIGMA,
    weights: jax.Array | None = None,
    burst: bool = True,
) -> jax.Array:
    """Hamming Embedding similarity with Gaussian weights and burstiness normalisation.

    ``M = Σ_x (#Y_c(x))^(−1/2) Σ_y w(h(b_x, b_y))`` (IJCV eq. 5–6, 12–13; [000] L6900–7026); the HQE
    paper's system: B = 64, h_t = 24, σ = 16, IDF weights, burstiness ([000] L21036–21064).
    ``x`` and ``y`` carry HE codes (:func:`replicate` with ``kernel='he'``).
    """

    def raw(a, b):
        h = hamming_distance(a.data[:, None, :], b.data[None, :, :])
        return _raw(a, b, he_weight(h, ht, sigma), weights, burst)

    return _normalised(raw(x, y), raw(x, x), raw(y, y))


@partial(jax.jit, static_argnames=("binary", "nbits", "burst"))
def smk(
    x: WordSet,
    y: WordSet,
    alpha: float = ALPHA,
    tau: float = TAU,
    binary: bool = False,
    nbits: int | None = None,
    weights: jax.Array | None = None,
    burst: bool = False,
) -> jax.Array:
    """SMK (``binary=False``, eq. 20) or SMK★ (eq. 23): ``M = Σ_x Σ_y σ_α(φ(x)ᵀφ(y))``.

    ``φ`` = the normalised residual (SMK) or the ±1/√B code (SMK★), from :func:`replicate`;
    ``nbits`` is B for codes (default: 32 × the packed width). ``burst`` adds the burstiness
    normalisation used when comparing with ASMK ([000] L7544–7549).
    """

    def raw(a, b):
        s = sigma_alpha(_entry_similarity(a, b, binary, nbits), alpha, tau)
        return _raw(a, b, s, weights, burst)

    return _normalised(raw(x, y), raw(x, x), raw(y, y))


def asmk_norm(x: WordSet, weights: jax.Array | None = None) -> jax.Array:
    """ASMK self-similarity ``Σ_{c∈C_X} w_c`` (``σ_α(1) = 1`` per word; SPEC §6.2)."""
    return jnp.sum(jnp.where(x.mask, _word_weights(x, weights), 0.0))


@partial(jax.jit, static_argnames=("binary", "nbits"))
def asmk(
    x: WordSet,
    y: WordSet,
    alpha: float = ALPHA,
    tau: float = TAU,
    binary: bool = True,
    nbits: int | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """ASMK (eq. 22) / ASMK★ (eq. 24, default): ``γ(X)γ(Y) Σ_c w_c σ_α(Φ(X_c)ᵀΦ(Y_c))``.

    ``x`` and ``y`` come from :func:`aggregate`; ``γ(X) = (Σ_{c∈C_X} w_c)^(−1/2)`` as in HOW and the
    asmk package. α = 3, τ = 0. For codes, ``nbits`` is the descriptor dimension d; the default,
    32 × the packed width, is the asmk package's denominator (the same when d is a multiple of 32).
    """
    s = sigma_alpha(_entry_similarity(x, y, binary, nbits), alpha, tau)
    raw = _raw(x, y, s, weights, False)
    return _normalised(raw, asmk_norm(x, weights), asmk_norm(y, weights))


def pairwise(kernel, xs: WordSet, ys: WordSet, batch_size: int = 16, **params) -> jax.Array:
    """Similarity matrix ``(Nx, Ny)`` of two batches of sets under ``kernel`` (e.g. :func:`asmk`).

    A dense reference for small collections (cost ``Nx·Ny·P·Q``); ``batch_size`` database sets are
    compared at a time. Use :mod:`jret.ivf` for large databases.
    """
    fn = partial(kernel, **params)

    def row(x):
        return lax.map(lambda y: fn(x, y), ys, batch_size=batch_size)

    return lax.map(row, xs)
