"""Deep spatial matching (DSM): fast spatial matching of activation features and re-ranking.

Siméoni, Avrithis & Chum, "Local features and visual words emerge in activations", CVPR 2019
([001] L129–143, L190–192; SPEC §9.1), on the features of :mod:`jret.dsm_features`.

* Tentative correspondences: every pair of a query and a database feature of the same channel
  (many-to-many), padded to a static ``max_correspondences`` (default 4096; beyond it the
  correspondences of the weakest query features are dropped and ``n_tentative`` tells).
* Hypotheses (fast spatial matching, Philbin et al. 2007): one per correspondence, from its two
  ellipses. With ``Σ = L Lᵀ``, L lower-triangular in ``(x, y)`` order, each ellipse is mapped to
  the unit circle keeping the vertical direction, and ``T(z) = µ₂ + L₂ L₁⁻¹ (z − µ₁)``: the 5-dof
  upright model (translation, anisotropic scale, vertical shear; ``L₂L₁⁻¹ = [[a, 0], [b, c]]``).
  All hypotheses are enumerated, vectorised in chunks of ``chunk`` hypotheses; a hypothesis whose
  scale change ``sqrt|det(L₂L₁⁻¹)|`` is outside ``[1/3, 3]`` is rejected.
* Inliers of a hypothesis: correspondences of the same (query scale, database scale) pair with
  ``‖T(µ₁) − µ₂‖ ≤ 2`` cells of the activation map. Taking the best hypothesis over all
  correspondences is the paper's maximum over the 9 scale pairs.
* Local optimisation (LO-RANSAC, [001] L135): the ``lo_candidates`` (4) hypotheses with the most
  inliers are refined for ``lo_iters`` (5) rounds by a least-squares fit of the same 5-dof model to
  their inlier centres, a refit being kept when it has more inliers and passes the scale test
  [JRET; the reference RANSAC is a binary without source].
* Score: the number of inliers. :func:`shortlist_inliers` verifies each (query, image) pair of
  the short-lists once per (query scale, image scale) pair, on the features of those scales, and
  keeps the maximum ([001] L141–143): the same as one :func:`verify` of all scales up to which
  hypotheses LO refines, and far cheaper (the cost is quadratic in the correspondences).
  :func:`sort_shortlists` sorts the top 100 of the initial ranking by inliers (or inliers ×
  global similarity), descending and stable (ties keep the initial order); the rest is
  unchanged; :func:`rerank` does both. Junk images can be taken out of the short-list first
  (``drop_junk``, the DELG/CVNet protocol; off by default, SPEC §1.4.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jret._checks import check_finite, check_integer, check_ndim, check_positive_int
from jret.dsm_features import LocalFeatures

_EPS = 1e-6
_PAIR_BLOCK = 128  # verification units per call of the re-ranking: one compiled shape
_MIN_UNIT = 32  # smallest padded number of correspondences of a re-ranking unit


@flax.struct.dataclass
class Match:
    """Result of :func:`verify` for one image pair (leading batch axes under ``vmap``).

    Attributes:
      inliers: ``()`` int32 number of inliers of the best model.
      transform: ``(2, 3)`` float32 ``[A | t]`` mapping query ``(x, y)`` to database ``(x, y)``,
        in cells of the matched scales.
      scales: ``(2,)`` int32 (query scale, database scale) of the best model.
      pairs: ``(C, 2)`` int32 tentative correspondences (query index, database index).
      pair_mask: ``(C,)`` bool, False on padding.
      inlier_mask: ``(C,)`` bool inliers of the best model.
      n_tentative: ``()`` int32 number of tentative correspondences before padding/truncation.
    """

    inliers: jax.Array
    transform: jax.Array
    scales: jax.Array
    pairs: jax.Array
    pair_mask: jax.Array
    inlier_mask: jax.Array
    n_tentative: jax.Array


def cholesky_xy(sigma: jax.Array) -> jax.Array:
    """Lower-triangular ``L (..., 2, 2)`` with ``L Lᵀ = Σ`` for covariances in ``(x, y)`` order."""
    sxx, sxy, syy = sigma[..., 0, 0], sigma[..., 0, 1], sigma[..., 1, 1]
    l11 = jnp.sqrt(jnp.maximum(sxx, _EPS))
    l21 = sxy / l11
    l22 = jnp.sqrt(jnp.maximum(syy - l21**2, _EPS))
    zero = jnp.zeros_like(l11)
    return jnp.stack([jnp.stack([l11, zero], -1), jnp.stack([l21, l22], -1)], -2)


def ellipse_hypothesis(
    mu1: jax.Array, sigma1: jax.Array, mu2: jax.Array, sigma2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """5-dof upright transform ``z ↦ A z + t`` taking ellipse 1 onto ellipse 2 (SPEC §9.1).

    ``A = L₂ L₁⁻¹`` (lower-triangular), ``t = µ₂ − A µ₁``; shapes ``(..., 2, 2)`` and ``(..., 2)``.
    """
    l1, l2 = cholesky_xy(sigma1), cholesky_xy(sigma2)
    inv1 = jnp.stack(
        [
            jnp.stack([1.0 / l1[..., 0, 0], jnp.zeros_like(l1[..., 0, 0])], -1),
            jnp.stack([-l1[..., 1, 0] / (l1[..., 0, 0] * l1[..., 1, 1]), 1.0 / l1[..., 1, 1]], -1),
        ],
        -2,
    )
    a = l2 @ inv1
    t = mu2 - jnp.einsum("...ij,...j->...i", a, mu1)
    return a, t


def fit_upright(
    src: jax.Array, dst: jax.Array, weight: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted least-squares 5-dof upright fit ``dst ≈ A src + t`` on points ``(P, 2)``.

    ``x' = a x + t_x`` and ``y' = b x + c y + t_y`` are fitted separately on centred points.
    Returns ``A (2, 2)``, ``t (2,)`` and ``ok`` (False when fewer than 3 points or degenerate).
    """
    w = weight.astype(src.dtype)
    total = w.sum()
    safe = jnp.maximum(total, _EPS)
    ms, md = (w @ src) / safe, (w @ dst) / safe
    s, d = src - ms, dst - md
    sxx, sxy, syy = w @ (s[:, 0] ** 2), w @ (s[:, 0] * s[:, 1]), w @ (s[:, 1] ** 2)
    bx, by_x, by_y = w @ (s[:, 0] * d[:, 0]), w @ (s[:, 0] * d[:, 1]), w @ (s[:, 1] * d[:, 1])
    det = sxx * syy - sxy**2
    scale = jnp.maximum(sxx * syy, _EPS)
    ok = (total >= 3) & (sxx > _EPS * safe) & (det > 1e-4 * scale)
    a = bx / jnp.where(ok, sxx, 1.0)
    det_safe = jnp.where(ok, det, 1.0)
    b = (syy * by_x - sxy * by_y) / det_safe
    c = (sxx * by_y - sxy * by_x) / det_safe
    A = jnp.array([[a, 0.0], [b, c]], dtype=src.dtype)
    t = md - A @ ms
    return A, t, ok


def _scale_ok(a: jax.Array, max_scale_change: float) -> jax.Array:
    det = jnp.abs(jnp.linalg.det(a))
    return (det >= 1.0 / max_scale_change**2) & (det <= max_scale_change**2)


def tentative_correspondences(
    q: LocalFeatures, d: LocalFeatures, max_correspondences: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same-channel pairs ``(C, 2)`` (query index, database index), their mask ``(C,)`` and the
    untruncated count; ordered by query feature, then database index.
    """
    big = jnp.iinfo(jnp.int32).max
    key_d = jnp.where(d.mask, d.channel, big)
    order_d = jnp.argsort(key_d, stable=True)
    sorted_d = key_d[order_d]
    lo = jnp.searchsorted(sorted_d, q.channel, side="left")
    hi = jnp.searchsorted(sorted_d, q.channel, side="right")
    count = jnp.where(q.mask, hi - lo, 0).astype(jnp.int32)
    ends = jnp.cumsum(count)
    slot = jnp.arange(max_correspondences, dtype=jnp.int32)
    i = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), q.mask.shape[0] - 1)
    j_sorted = lo[i] + slot - (ends[i] - count[i])
    valid = slot < ends[-1]
    j = order_d[jnp.clip(j_sorted, 0, d.mask.shape[0] - 1)]
    pairs = jnp.where(valid[:, None], jnp.stack([i, j], -1), 0).astype(jnp.int32)
    return pairs, valid, ends[-1]


def _inliers(a, t, src, dst, allowed, threshold):
    """Inliers ``(C,)`` of the model ``z ↦ a z + t`` among the ``allowed`` correspondences."""
    err = src @ a.T + t - dst
    return allowed & (jnp.sum(err**2, -1) <= threshold**2)


def _verify_core(
    q: LocalFeatures,
    d: LocalFeatures,
    threshold: float,
    max_scale_change: float,
    lo_iters: int,
    lo_candidates: int,
    max_correspondences: int,
    chunk: int,
) -> Match:
    q, d = jax.tree.map(jnp.asarray, q), jax.tree.map(jnp.asarray, d)
    pairs, valid, n_tent = tentative_correspondences(q, d, max_correspondences)
    qi, di = pairs[:, 0], pairs[:, 1]
    src, dst = q.mu[qi], d.mu[di]
    sq, sd = q.scale[qi], d.scale[di]
    hyp_a, hyp_t = ellipse_hypothesis(src, q.sigma[qi], dst, d.sigma[di])
    hyp_ok = valid & _scale_ok(hyp_a, max_scale_change)

    def count(a, t, s_q, s_d):
        err = jnp.einsum("cj,hij->hci", src, a) + t[:, None, :] - dst[None]
        close = jnp.sum(err**2, -1) <= threshold**2
        same = (sq[None] == s_q[:, None]) & (sd[None] == s_d[:, None])
        return jnp.sum(close & same & valid[None], -1, dtype=jnp.int32)

    n_chunks = max_correspondences // chunk
    counts = jax.lax.map(
        lambda x: count(*x),
        (
            hyp_a.reshape(n_chunks, chunk, 2, 2),
            hyp_t.reshape(n_chunks, chunk, 2),
            sq.reshape(n_chunks, chunk),
            sd.reshape(n_chunks, chunk),
        ),
    ).reshape(-1)
    counts = jnp.where(hyp_ok, counts, 0)
    k = min(lo_candidates, max_correspondences)
    _, cand = jax.lax.top_k(counts, k)

    def refine(h):
        allowed = valid & (sq == sq[h]) & (sd == sd[h])

        def step(_, state):
            a, t, n = state
            a2, t2, ok = fit_upright(src, dst, _inliers(a, t, src, dst, allowed, threshold))
            ok = ok & _scale_ok(a2, max_scale_change)
            n2 = jnp.sum(_inliers(a2, t2, src, dst, allowed, threshold), dtype=jnp.int32)
            better = ok & (n2 > n)
            return (
                jnp.where(better, a2, a),
                jnp.where(better, t2, t),
                jnp.where(better, n2, n),
            )

        return jax.lax.fori_loop(0, lo_iters, step, (hyp_a[h], hyp_t[h], counts[h]))

    a_lo, t_lo, n_lo = jax.vmap(refine)(cand)
    n_lo = jnp.where(hyp_ok[cand], n_lo, 0)
    best = jnp.argmax(n_lo)
    h = cand[best]
    a, t, n = a_lo[best], t_lo[best], n_lo[best]
    found = n > 0
    allowed = found & valid & (sq == sq[h]) & (sd == sd[h])
    inliers = _inliers(a, t, src, dst, allowed, threshold)
    transform = jnp.where(found, jnp.concatenate([a, t[:, None]], 1), jnp.eye(2, 3))
    return Match(
        inliers=jnp.where(found, n, 0).astype(jnp.int32),
        transform=transform.astype(jnp.float32),
        scales=jnp.where(found, jnp.stack([sq[h], sd[h]]), 0).astype(jnp.int32),
        pairs=pairs,
        pair_mask=valid,
        inlier_mask=inliers,
        n_tentative=n_tent,
    )


_STATIC = ("lo_iters", "lo_candidates", "max_correspondences", "chunk")


@partial(jax.jit, static_argnames=_STATIC)
def _verify_jit(
    q, d, threshold, max_scale_change, lo_iters, lo_candidates, max_correspondences, chunk
):
    return _verify_core(
        q, d, threshold, max_scale_change, lo_iters, lo_candidates, max_correspondences, chunk
    )


def _at(f: LocalFeatures, i: jax.Array, scale: jax.Array) -> LocalFeatures:
    """Set ``i`` of a batch of sets, restricted to the features of ``scale`` (all if < 0)."""
    f = jax.tree.map(lambda x: x[i], f)
    return f.replace(mask=f.mask & ((scale < 0) | (f.scale == scale)))


@partial(jax.jit, static_argnames=(*_STATIC, "image_batch", "full"))
def _verify_pairs_jit(
    q,
    d,
    units,
    threshold,
    max_scale_change,
    lo_iters,
    lo_candidates,
    max_correspondences,
    chunk,
    image_batch,
    full,
):
    """Verify ``units (P, 4)`` = (query, image, query scale, image scale) rows, a scale of -1
    standing for all: a :class:`Match` ``(P,)`` or the inliers ``(P,)``."""

    def one(unit):
        match = _verify_core(
            _at(q, unit[0], unit[2]),
            _at(d, unit[1], unit[3]),
            threshold,
            max_scale_change,
            lo_iters,
            lo_candidates,
            max_correspondences,
            chunk,
        )
        return match if full else match.inliers

    return jax.lax.map(one, units, batch_size=image_batch)


def _check_features(f: LocalFeatures, name: str, batch_ndim: int) -> None:
    if not isinstance(f, LocalFeatures):
        raise ValueError(f"{name}: expected LocalFeatures, got {type(f).__name__}")
    check_ndim(f.mask, f"{name}.mask", (batch_ndim + 1,), f"{batch_ndim + 1}-D (..., M)")
    m_shape = f.mask.shape
    shapes = {
        "channel": m_shape,
        "strength": m_shape,
        "scale": m_shape,
        "mu": (*m_shape, 2),
        "sigma": (*m_shape, 2, 2),
    }
    for field, want in shapes.items():
        got = tuple(np.shape(getattr(f, field)))
        if got != want:
            raise ValueError(f"{name}.{field}: expected shape {want}, got {got}")
    check_integer(f.channel, f"{name}.channel")
    check_integer(f.scale, f"{name}.scale")


def _check_options(
    threshold, max_scale_change, lo_iters, lo_candidates, max_correspondences, chunk
):
    if not threshold > 0:
        raise ValueError(f"threshold: expected a positive number of cells, got {threshold!r}")
    if not max_scale_change >= 1:
        raise ValueError(f"max_scale_change: expected >= 1, got {max_scale_change!r}")
    if isinstance(lo_iters, bool) or not isinstance(lo_iters, (int, np.integer)) or lo_iters < 0:
        raise ValueError(f"lo_iters: expected a non-negative integer, got {lo_iters!r}")
    check_positive_int(lo_candidates, "lo_candidates")
    check_positive_int(max_correspondences, "max_correspondences")
    check_positive_int(chunk, "chunk")


def _padded_size(n: int, chunk: int) -> int:
    return -(-max(n, 1) // chunk) * chunk


def verify(
    q_feats: LocalFeatures,
    db_feats: LocalFeatures,
    *,
    threshold: float = 2.0,
    max_scale_change: float = 3.0,
    lo_iters: int = 5,
    lo_candidates: int = 4,
    max_correspondences: int = 4096,
    chunk: int = 256,
    image_batch: int = 8,
) -> Match:
    """Spatially verify database features against one query's (see the module docstring).

    Args:
      q_feats: query :class:`LocalFeatures` ``(Mq,)``.
      db_feats: database features ``(Md,)`` for one image or ``(B, Md)`` for B images (matched
        with ``lax.map`` over ``image_batch`` images at a time, each batch vmapped).
      threshold: inlier distance in cells of the activation map (2).
      max_scale_change: largest scale change of a hypothesis (3).
      lo_iters, lo_candidates: LO rounds (5) and hypotheses refined (4).
      max_correspondences: padded number of tentative correspondences (4096), rounded up to a
        multiple of ``chunk``.
      chunk: hypotheses evaluated at a time (memory ``chunk × C``).
      image_batch: database images vmapped at a time when ``db_feats`` is batched.

    Returns:
      :class:`Match` with no batch axis, or ``(B,)`` for batched ``db_feats``.
    """
    _check_features(q_feats, "q_feats", 0)
    if not isinstance(db_feats, LocalFeatures):
        raise ValueError(f"db_feats: expected LocalFeatures, got {type(db_feats).__name__}")
    batched = np.ndim(db_feats.mask) == 2
    _check_features(db_feats, "db_feats", 1 if batched else 0)
    _check_options(threshold, max_scale_change, lo_iters, lo_candidates, max_correspondences, chunk)
    chunk = min(chunk, max_correspondences)
    c = _padded_size(max_correspondences, chunk)
    args = (float(threshold), float(max_scale_change), int(lo_iters), int(lo_candidates), c, chunk)
    if not batched:
        return _verify_jit(q_feats, db_feats, *args)
    n = db_feats.mask.shape[0]
    q = jax.tree.map(lambda x: jnp.asarray(x)[None], q_feats)
    units = np.stack([np.zeros(n), np.arange(n), -np.ones(n), -np.ones(n)], 1).astype(np.int32)
    batch = check_positive_int(image_batch, "image_batch")
    return _verify_pairs_jit(q, db_feats, units, *args, batch, True)


def _channel_histograms(f: LocalFeatures, n_scales: int, channels: int) -> np.ndarray:
    """Features per scale and channel ``(N, n_scales, channels)`` of padded sets ``(N, M)``."""
    scale, channel, mask = (np.asarray(x) for x in (f.scale, f.channel, f.mask))
    rows = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)
    hist = np.zeros((mask.shape[0], n_scales, channels), np.int32)
    np.add.at(hist, (rows[mask], scale[mask], channel[mask]), 1)
    return hist


def _junk_last(ids: np.ndarray, junk: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Column order ``(nq, k)`` that moves each row's junk ids to its end (stable)."""
    order = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    if junk is None:
        return order
    if len(junk) != ids.shape[0]:
        raise ValueError(
            f"drop_junk: expected one id list per query ({ids.shape[0]}), got {len(junk)}"
        )
    is_junk = np.stack(
        [np.isin(row, np.asarray(bad, np.int64)) for row, bad in zip(ids, junk, strict=True)]
    )
    return np.argsort(is_junk, axis=1, kind="stable")


def shortlist_inliers(
    ids,
    q_feats: LocalFeatures,
    db_feats: LocalFeatures,
    top: int = 100,
    *,
    drop_junk: Sequence[Sequence[int]] | None = None,
    threshold: float = 2.0,
    max_scale_change: float = 3.0,
    lo_iters: int = 5,
    lo_candidates: int = 4,
    max_correspondences: int = 4096,
    chunk: int = 256,
    image_batch: int = 8,
    validate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Inliers of the ``top`` images of each query's ranking (the DSM score, [001] L139–143).

    Every (query, image) pair is verified on device once per (query scale, image scale) pair
    and keeps the maximum (see the module docstring); units with similar numbers of tentative
    correspondences run together (padded to the next power of two, at least 32, at most
    ``max_correspondences`` rounded up to a power of two).

    Args:
      ids: ``(nq, k)`` initial ranking (database ids by decreasing similarity).
      q_feats: query features ``(nq, Mq)``.
      db_feats: database features ``(n_db, Md)``, indexed by the ids.
      top: short-list length (100).
      drop_junk: None (default) or one list of junk ids per query, moved behind the short-list
        first (per-protocol re-ranking, SPEC §1.4.5: one call per setup).
      threshold, max_scale_change, lo_iters, lo_candidates, max_correspondences, chunk,
        image_batch: as in :func:`verify` (``chunk`` rounded down to a power of two;
        ``image_batch`` units vmapped at a time).
      validate: check that the ids are in range.

    Returns:
      ``ids (nq, k)`` (with the junk moved to the end of each row when given) and ``inliers
      (nq, top')`` of ``ids[:, :top']``, ``top' = min(top, k)``.
    """
    ids = np.asarray(ids)
    check_ndim(ids, "ids", (2,), "a 2-D array (nq, k)")
    check_integer(ids, "ids")
    top = min(check_positive_int(top, "top"), ids.shape[1])
    _check_features(q_feats, "q_feats", 1)
    if not isinstance(db_feats, LocalFeatures):
        raise ValueError(f"db_feats: expected LocalFeatures, got {type(db_feats).__name__}")
    _check_features(db_feats, "db_feats", 1)
    _check_options(threshold, max_scale_change, lo_iters, lo_candidates, max_correspondences, chunk)
    image_batch = check_positive_int(image_batch, "image_batch")
    nq, n_db = ids.shape[0], db_feats.mask.shape[0]
    if q_feats.mask.shape[0] != nq:
        raise ValueError(f"q_feats: expected {nq} queries (as ids), got {q_feats.mask.shape[0]}")
    if validate and ids.size and (ids.min() < 0 or ids.max() >= n_db):
        raise ValueError(f"ids: expected ids in [0, {n_db}), got {ids.min()}..{ids.max()}")
    ids = np.take_along_axis(ids, _junk_last(ids, drop_junk), 1)
    short = ids[:, :top]
    units, sizes = _units(q_feats, db_feats, short, max_correspondences)
    chunk = int(_pow2(chunk + 1)) // 2  # a power of two, so that it divides every size
    args = (float(threshold), float(max_scale_change), int(lo_iters), int(lo_candidates))
    inliers = np.zeros((nq, top), np.int32)
    for c in np.unique(sizes):
        todo = units[sizes == c]
        for first in range(0, len(todo), _PAIR_BLOCK):
            block = todo[first : first + _PAIR_BLOCK]
            padded = np.pad(block, ((0, _PAIR_BLOCK - len(block)), (0, 0)), mode="edge")
            padded[:, 1] = short[padded[:, 0], padded[:, 1]]
            got = _verify_pairs_jit(
                q_feats, db_feats, padded, *args, int(c), min(chunk, int(c)), image_batch, False
            )
            np.maximum.at(inliers, (block[:, 0], block[:, 1]), np.asarray(got)[: len(block)])
    return ids, inliers


def sort_shortlists(ids, inliers, sims=None) -> tuple[np.ndarray, np.ndarray]:
    """Sort the head ``ids[:, :top]`` of a ranking ``(nq, k)`` by its ``inliers (nq, top)``.

    Descending and stable (ties keep the initial order); ranks beyond ``top`` keep their order
    ([001] L190; SPEC §9.1). With ``sims (nq, top)``, the global similarities of the head, the
    score is inliers × similarity instead: the score with which DSM picks the images that seed
    diffusion ([001] L194), used as a re-ranking score [JRET].

    Returns ``(new_ids (nq, k), inliers (nq, top))``, the inliers in the new order.
    """
    ids, inliers = np.asarray(ids), np.asarray(inliers)
    check_ndim(inliers, "inliers", (2,), "(nq, top)")
    top = inliers.shape[1]
    if ids.ndim != 2 or ids.shape[0] != inliers.shape[0] or ids.shape[1] < top:
        raise ValueError(
            f"ids: expected (nq, k >= top) for inliers {inliers.shape}, got {ids.shape}"
        )
    score = inliers.astype(np.float64)
    if sims is not None:
        if np.shape(sims) != inliers.shape:
            raise ValueError(
                f"sims: expected the shape of inliers {inliers.shape}, got {np.shape(sims)}"
            )
        score = score * np.asarray(sims, np.float64)
    order = np.argsort(-score, axis=1, kind="stable")
    new_ids = ids.copy()
    new_ids[:, :top] = np.take_along_axis(ids[:, :top], order, 1)
    return new_ids, np.take_along_axis(inliers, order, 1)


def rerank(
    ids, q_feats: LocalFeatures, db_feats: LocalFeatures, top: int = 100, *, sims=None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """DSM re-ranking: :func:`shortlist_inliers`, then :func:`sort_shortlists`.

    ``sims`` are the ``(nq, k)`` global similarities of ``ids`` (None: sort by inliers, the
    paper); ``kwargs`` go to :func:`shortlist_inliers`. Returns ``(new_ids (nq, k), inliers
    (nq, top'))``, ``inliers[i, r]`` belonging to ``new_ids[i, r]``.
    """
    if sims is not None and np.shape(sims) != np.shape(ids):
        raise ValueError(f"sims: expected the shape of ids {np.shape(ids)}, got {np.shape(sims)}")
    moved, inliers = shortlist_inliers(ids, q_feats, db_feats, top, **kwargs)
    if sims is not None:
        order = _junk_last(np.asarray(ids), kwargs.get("drop_junk"))
        sims = np.take_along_axis(np.asarray(sims), order, 1)[:, : inliers.shape[1]]
        if kwargs.get("validate", True):
            check_finite(sims, "sims")
    return sort_shortlists(moved, inliers, sims)


def _units(
    q: LocalFeatures, d: LocalFeatures, short: np.ndarray, max_correspondences: int
) -> tuple[np.ndarray, np.ndarray]:
    """Verification units ``(U, 4)`` = (query, short-list rank, query scale, image scale) with at
    least one tentative correspondence, and their padded sizes ``(U,)``: the next power of two
    of their correspondences, at least ``_MIN_UNIT`` and at most the power of two of
    ``max_correspondences``."""
    n_scales = 1 + int(max(np.max(q.scale, initial=0), np.max(d.scale, initial=0)))
    channels = 1 + int(max(np.max(q.channel, initial=0), np.max(d.channel, initial=0)))
    hq = _channel_histograms(q, n_scales, channels)
    hd = _channel_histograms(d, n_scales, channels)
    needed = np.stack([np.einsum("ksc,tc->kts", hd[row], hq[i]) for i, row in enumerate(short)])
    units = np.argwhere(needed > 0).astype(np.int32)
    count = needed[tuple(units.T)]
    return units, np.clip(_pow2(count), _MIN_UNIT, _pow2(max_correspondences))


def _pow2(n) -> np.ndarray:
    """The smallest power of two >= ``n`` (elementwise, ``n >= 1``)."""
    return 1 << np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64)
