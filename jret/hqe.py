"""Hamming query expansion (HQE) on top of a binary-code match kernel (HE, SMK★, ASMK★).

Tolias & Jégou, "Visual query expansion with or without geometry: refining local descriptors by
feature aggregation", Pattern Recognition 2014 ([000] L20991–21504; SPEC §7.4):

1. The query is issued to the system (HE with Gaussian weights, burstiness and IDF; query MA).
2. On the top ``shortlist = 100`` images, count strict correspondences
   ``C(Q, P) = #{(q, p): same word, h(q, p) ≤ h*}`` with ``h* = 16`` (64-bit HE codes).
3. Images with ``C ≥ c_t`` are reliable: ``c_t = 5`` with multiple assignment (4 without).
4. Words are ranked by the number of reliable images containing them; walking that list, words
   enter V until the number of augmented words (not in the query) reaches ``α·|V_Q|``, α = 0.5.
5. ``Q_E = Q ∪ {p of a reliable image : v(p) ∈ V}``.
6. One signature per word of Q_E: the bitwise majority of its codes, ties broken at random (½).

The expanded query is re-issued to the same system. With the selective match kernels (ASMK paper,
[000] L7551–7567), correspondences use the similarity threshold τ = 0.5, i.e. ``h* = B/4``, and 5
correspondences make an image reliable; the other steps are the same.

Sets are :class:`jret.kernels.WordSet` with packed binary codes (HE codes from
:func:`jret.kernels.replicate`, or aggregated ASMK★ vectors from :func:`jret.kernels.aggregate` /
:func:`jret.ivf.image_sets`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jret import kernels
from jret._checks import check_positive_int
from jret.kernels import WordSet

SHORTLIST = 100
STRICT_HE = 16
STRICT_TAU = 0.5
MIN_CORRESPONDENCES = 5
ALPHA = 0.5
SYSTEMS = ("he", "smk", "asmk")


class HQEResult(NamedTuple):
    """Output of :func:`hqe`.

    Attributes:
      expanded: the expanded query ``(P + ⌊α·P⌋,)`` slots, one entry per word, majority codes.
      reliable: ``(S,)`` bool, the shortlisted images judged reliable.
      correspondences: ``(S,)`` int32 strict correspondence counts ``C(Q, P)``.
    """

    expanded: WordSet
    reliable: jax.Array
    correspondences: jax.Array


def _strict(system: str, strict: int | None, nbits: int) -> int:
    if strict is not None:
        return int(strict)
    return STRICT_HE if system == "he" else int(round(nbits * (1 - STRICT_TAU) / 2))


@jax.jit
def correspondences(query: WordSet, shortlist: WordSet, strict: int) -> jax.Array:
    """Strict correspondence counts ``(S,)``: entry pairs with the same word and ``h ≤ strict``."""

    def count(image: WordSet) -> jax.Array:
        same = (
            (query.words[:, None] == image.words[None, :])
            & query.mask[:, None]
            & image.mask[None, :]
        )
        h = kernels.hamming_distance(query.data[:, None, :], image.data[None, :, :])
        return jnp.sum(same & (h <= strict), dtype=jnp.int32)

    return jax.vmap(count)(shortlist)


def _member(sorted_words: jax.Array, sorted_ok: jax.Array, x: jax.Array) -> jax.Array:
    """Whether each ``x`` is among ``sorted_words[sorted_ok]`` (valid ones sorted first)."""
    big = jnp.iinfo(jnp.int32).max
    keys = jnp.where(sorted_ok, sorted_words, big)
    pos = jnp.clip(jnp.searchsorted(keys, x), 0, keys.shape[0] - 1)
    return (keys[pos] == x) & (x != big)


def _distinct(words: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sorted distinct valid words (padding after) and their mask."""
    zeros = jnp.zeros_like(words)
    _, w, _, ok = kernels.segment_aggregate(zeros, words, jnp.zeros((words.shape[0], 0)), valid)
    return w, ok


@jax.jit
def select_words(query: WordSet, shortlist: WordSet, reliable: jax.Array, alpha: float) -> tuple:
    """Reliable visual words V (step 4): ``(words, mask)`` sorted by word id.

    Words of reliable images are ranked by the number of reliable images containing them (ties:
    lower word id first); the walk stops before the ``⌊α·|V_Q|⌋ + 1``-th augmented word, and query
    words met on the way enter V as well (SPEC §7.4, [AMBIG → JRET]).
    """
    s, q = shortlist.words.shape
    valid = (shortlist.mask & reliable[:, None]).reshape(-1)
    image = jnp.broadcast_to(jnp.arange(s)[:, None], (s, q)).reshape(-1)
    pair_w, _, _, pair_ok = kernels.segment_aggregate(
        shortlist.words.reshape(-1), image, jnp.zeros((s * q, 0)), valid
    )
    _, word, count, word_ok = kernels.segment_aggregate(
        jnp.zeros_like(pair_w), pair_w, jnp.ones((s * q, 1)), pair_ok
    )
    count = jnp.where(word_ok, count[:, 0], 0.0)
    order = jnp.lexsort((word, -count))
    word, count, word_ok = word[order], count[order], word_ok[order]
    q_words, q_ok = _distinct(query.words, query.mask)
    in_query = _member(q_words, q_ok, word)
    n_aug = jnp.floor(alpha * jnp.sum(q_ok)).astype(jnp.int32)
    is_aug = (word_ok & ~in_query).astype(jnp.int32)
    chosen = word_ok & (jnp.cumsum(is_aug) - is_aug < n_aug)
    return _distinct(word, chosen)


def hqe(
    key: jax.Array,
    query: WordSet,
    shortlist: WordSet,
    *,
    system: str = "he",
    nbits: int | None = None,
    strict: int | None = None,
    min_correspondences: int = MIN_CORRESPONDENCES,
    alpha: float = ALPHA,
    shortlist_mask: jax.Array | None = None,
) -> HQEResult:
    """Expand a query from its top-ranked images (steps 2–6 above; jit-able).

    Args:
      key: ``jax.random`` key for the majority-vote tie breaks.
      query: the query's entries ``(P,)`` with packed codes ``(P, W)``.
      shortlist: the entries of the top-ranked database images ``(S, Q)`` (S = 100 by default in
        :func:`hqe_search`), codes ``(S, Q, W)`` of the same kind.
      system: ``'he'`` (h* = 16), ``'smk'`` or ``'asmk'`` (h* from τ = 0.5).
      nbits: code length B (default 32·W).
      strict: h*, overriding the system default.
      min_correspondences: c_t (5, the MA setting; 4 for single assignment).
      alpha: augmented words per query word (0.5 without geometry).
      shortlist_mask: optional ``(S,)`` bool, False for shortlist slots to ignore.

    Returns a :class:`HQEResult`; the expanded query has ``P + ⌊α·P⌋`` slots.
    """
    if system not in SYSTEMS:
        raise ValueError(f"system: expected one of {SYSTEMS}, got {system!r}")
    if query.data.ndim != 2 or shortlist.data.ndim != 3:
        raise ValueError(
            "query, shortlist: expected one set (P,) and a batch (S, Q) of packed codes, got data "
            f"shapes {query.data.shape} and {shortlist.data.shape}"
        )
    if query.data.dtype != jnp.uint32 or shortlist.data.dtype != jnp.uint32:
        raise ValueError("query, shortlist: expected packed binary codes (uint32 data)")
    if query.data.shape[-1] != shortlist.data.shape[-1]:
        raise ValueError(
            f"query, shortlist: code widths differ ({query.data.shape[-1]} vs {shortlist.data.shape[-1]})"
        )
    check_positive_int(min_correspondences, "min_correspondences")
    if alpha < 0:
        raise ValueError(f"alpha: expected a non-negative value, got {alpha}")
    width = query.data.shape[-1]
    nbits = 32 * width if nbits is None else check_positive_int(nbits, "nbits")
    size = query.words.shape[0] + int(np.floor(alpha * query.words.shape[0]))
    mask = jnp.ones(shortlist.words.shape[:1], bool) if shortlist_mask is None else shortlist_mask
    return _expand(
        key,
        query,
        shortlist,
        jnp.asarray(mask, bool),
        _strict(system, strict, nbits),
        min_correspondences,
        alpha,
        nbits,
        min(size, query.words.shape[0] + shortlist.words.size),
    )


@partial(jax.jit, static_argnames=("nbits", "size"))
def _expand(key, query, shortlist, shortlist_mask, strict, min_correspondences, alpha, nbits, size):
    count = correspondences(query, shortlist, strict)
    reliable = (count >= min_correspondences) & shortlist_mask
    v_words, v_ok = select_words(query, shortlist, reliable, alpha)
    s, q, width = shortlist.data.shape
    extra = (shortlist.mask & reliable[:, None]).reshape(-1)
    extra = extra & _member(v_words, v_ok, shortlist.words.reshape(-1))
    words = jnp.concatenate([query.words, shortlist.words.reshape(-1)])
    valid = jnp.concatenate([query.mask, extra])
    codes = jnp.concatenate([query.data, shortlist.data.reshape(s * q, width)])
    signs = jnp.where(kernels.unpack_bits(codes, nbits), 1.0, -1.0)
    _, out_w, votes, out_ok = kernels.segment_aggregate(jnp.zeros_like(words), words, signs, valid)
    votes = votes[:size]
    coin = jax.random.bernoulli(key, 0.5, votes.shape)
    bits = (votes > 0) | ((votes == 0) & coin)
    expanded = WordSet(words=out_w[:size], data=kernels.pack_bits(bits), mask=out_ok[:size])
    return HQEResult(expanded=expanded, reliable=reliable, correspondences=count)


def _system_similarity(system: str, nbits: int, weights, params: dict):
    if system == "he":
        return lambda x, y: kernels.he(x, y, weights=weights, **params)
    if system == "smk":
        return lambda x, y: kernels.smk(x, y, binary=True, nbits=nbits, weights=weights, **params)
    return lambda x, y: kernels.asmk(x, y, binary=True, nbits=nbits, weights=weights, **params)


def hqe_search(
    key: jax.Array,
    query: WordSet,
    database: WordSet,
    *,
    system: str = "he",
    nbits: int | None = None,
    weights: jax.Array | None = None,
    shortlist: int = SHORTLIST,
    strict: int | None = None,
    min_correspondences: int = MIN_CORRESPONDENCES,
    alpha: float = ALPHA,
    batch_size: int = 16,
    **kernel_params,
) -> tuple[jax.Array, jax.Array, HQEResult]:
    """The full HQE pipeline against a padded database, with dense kernel scoring.

    Scores the query with the system's kernel (:func:`jret.kernels.he` by default, with its
    defaults h_t = 24, σ = 16 and burstiness; ``kernel_params`` are passed on), expands it from the
    top ``shortlist`` images with :func:`hqe`, and re-scores the expanded query with the same
    kernel. For large databases use :func:`hqe` with an inverted file (:mod:`jret.ivf`).

    Returns ``(initial scores (N,), final scores (N,), HQEResult)``.
    """
    width = query.data.shape[-1]
    nbits = 32 * width if nbits is None else nbits
    sim = _system_similarity(system, nbits, weights, kernel_params)

    def score(x: WordSet) -> jax.Array:
        return lax.map(lambda y: sim(x, y), database, batch_size=batch_size)

    n = database.words.shape[0]
    s = min(check_positive_int(shortlist, "shortlist"), n)
    initial = score(query)
    _, top = lax.top_k(initial, s)
    short = jax.tree.map(lambda x: x[top], database)
    result = hqe(
        key,
        query,
        short,
        system=system,
        nbits=nbits,
        strict=strict,
        min_correspondences=min_correspondences,
        alpha=alpha,
    )
    return initial, score(result.expanded), result
