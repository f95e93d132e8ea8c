"""Diffusion for retrieval: CG / Jacobi solvers, truncation, regional diffusion, FSR and hybrid.

Ranking by manifold similarity on a kNN graph (:mod:`jret.graph`) with normalised affinity ``S``
(SPEC §8). Every method computes (or approximates) the same ranking vector

    f* = h_α(S) y = (1 − α) (I − αS)^{-1} y,      α = 0.99,

so that their numbers compare (SPEC §8.3; the constant ``1 − α`` does not change a ranking):

* query vector (Iscen et al., CVPR 2017, eqs. 7, 8; SPEC §8.2): the query is *not* inserted in the
  graph; ``y_i = s_k(x_i|q) = max(x_iᵀq, 0)^γ`` on the query's ``k_q`` nearest database items
  (``k_q = 10`` global, 200 regional), summed over the query's regions for regional queries and
  then cut to its ``k_q`` largest entries;
* temporal filtering (CVPR 2017, §4.3): conjugate gradient on ``(I − αS) f = (1 − α) y`` (20
  iterations, relative tolerance 1e-6) or the Jacobi iteration ``f ← αS f + (1 − α) y`` (Zhou et
  al.'s diffusion; ≈ 110 iterations reach CG's mAP); batched over queries;
* truncation (CVPR 2017, §4.4; SPEC §8.4): the unnormalised affinity is sliced to the query's
  shortlist (its nearest database items) and re-normalised; items outside keep the kNN order;
* regional diffusion (CVPR 2017, §4.2; SPEC §8.5): nodes are region vectors; image scores are
  ``Σ_j w_j f*_{i_X(j)}`` with generalized max pooling weights ``w = (ΦΦᵀ + λI)^{-1} 1``, λ = 1;
* fast spectral ranking, FSR (Iscen et al., CVPR 2018; SPEC §8.6): offline eigenpairs ``(U, Λ)``
  of ``S`` (exact, randomised range finder "APPROX" or Lanczos), online ``x = U h(Λ) Uᵀ y`` for
  any transfer function ``h`` (default ``h_α(λ) = (1 − α)/(1 − αλ)``);
* hybrid spectral–temporal filtering (Iscen et al., ACCV 2018, Theorem 1; SPEC §8.7):
  ``x = U₁ g_α(Λ₁) U₁ᵀ y + x_t`` with ``g_α = h_α − h_α(0)`` on the top ``r = 400`` eigenpairs and
  ``x_t`` from 5 CG iterations on ``L_α(S − U₁Λ₁U₁ᵀ) x_t = y``, matrix-free;
* diffusion seeded by spatially verified images (DSM, Simeoni et al., CVPR 2019; SPEC §8.9).

Offline / online: build the graph (:func:`jret.graph.knn_graph`) and the eigenpairs
(:func:`fsr_fit`, :func:`hybrid_fit`) once and :func:`save` them; :func:`load` and query many times.

Ranking: items by decreasing ``f``; with ``fallback=True`` (default) the items the diffusion does
not reach (``f <= 0``: other connected components, outside a shortlist) follow in the order of
their plain similarity to the query, as the items outside a truncated shortlist do [JRET].

Shapes: queries ``(nq, D)`` or regional ``(nq, R, D)`` with a mask ``(nq, R)``; database nodes
``(n, D)``; sparse ``y`` as ``(nq, k_q)`` values and ids; dense ``f (nq, n)``. Queries are
processed ``query_block`` at a time (default 4 on CPU, 64 on accelerators), so memory is
``O(query_block × n)`` besides the graph.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax import lax

from jret import graph as graph_lib
from jret._checks import (
    check_finite,
    check_floating,
    check_integer,
    check_ndim,
    check_nonempty,
    check_positive_int,
    check_same_dim,
)
from jret.graph import Graph, operator

_POWERS = ("before_sum", "after_sum")
_SOLVERS = ("cg", "jacobi")
_METHODS = ("auto", "exact", "approx", "lanczos")
_COMPONENTS = ("all", "largest")


def default_query_block() -> int:
    """Queries solved together by default: 4 on CPU (the gathered vectors stay in cache; larger
    blocks are slower per query), 64 on accelerators."""
    return 4 if jax.default_backend() == "cpu" else 64


def h_alpha(alpha: float) -> Callable[[jax.Array], jax.Array]:
    """The transfer function ``h_α(λ) = (1 − α)/(1 − αλ)`` of diffusion (CVPR 2018, eq. 2)."""
    return lambda lam: (1.0 - alpha) / (1.0 - alpha * lam)


def _check_alpha(alpha) -> float:
    if not np.isscalar(alpha) or not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    return float(alpha)


# ----------------------------------------------------------------------------- query vectors


def _similarities(Q: jax.Array, X: jax.Array, q_mask: jax.Array | None) -> jax.Array:
    """``Q Xᵀ`` in float32: ``(b, n)`` for global queries, ``(b, R, n)`` (masked regions -inf)."""
    sims = jnp.einsum("...d,nd->...n", Q, X, preferred_element_type=jnp.float32)
    if q_mask is not None:
        sims = jnp.where(q_mask[..., None], sims, -jnp.inf)
    return sims.astype(jnp.float32)


def _sparse_y(sims: jax.Array, kq: int, gamma, power: str) -> tuple[jax.Array, jax.Array]:
    """The ``k_q`` largest entries of ``y`` (CVPR 2017, eqs. 7, 8): values and ids ``(b, kq)``."""
    if sims.ndim == 2:
        top, ids = lax.top_k(sims, kq)
        return jnp.maximum(top, 0.0) ** gamma, ids
    b, _, n = sims.shape
    top, ids = lax.top_k(sims, kq)
    if power == "before_sum":
        contrib = jnp.maximum(top, 0.0) ** gamma
    else:
        contrib = jnp.where(jnp.isfinite(top), top, 0.0)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], ids.shape)
    dense = jnp.zeros((b, n), jnp.float32).at[rows, ids].add(contrib)
    member = jnp.zeros((b, n), jnp.int32).at[rows, ids].add(jnp.isfinite(top)) > 0
    vals, ids = lax.top_k(jnp.where(member, dense, -jnp.inf), kq)
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0)
    if power == "after_sum":
        vals = jnp.maximum(vals, 0.0) ** gamma
    return vals, ids


def densify(vals: jax.Array, ids: jax.Array, n: int) -> jax.Array:
    """Dense ``y (b, n)`` from sparse rows ``vals, ids (b, kq)`` (duplicate ids add up)."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    return jnp.zeros((ids.shape[0], n), jnp.float32).at[rows, ids].add(vals)


def _check_queries(Q, X, q_mask, validate: bool) -> None:
    check_ndim(Q, "Q", (2, 3), "queries (nq, D) or regional queries (nq, R, D)")
    check_ndim(X, "X", (2,), "database (n, D)")
    check_floating(Q, "Q")
    check_floating(X, "X")
    check_same_dim(Q, X, "Q", "X")
    if q_mask is not None and (np.ndim(Q) != 3 or np.shape(q_mask) != np.shape(Q)[:2]):
        raise ValueError(
            f"q_mask: expected shape (nq, R) = {np.shape(Q)[:2]} for regional queries, "
            f"got {np.shape(q_mask)} with Q of shape {np.shape(Q)}"
        )
    if validate:
        check_nonempty(Q, "Q")
        check_nonempty(X, "X")
        check_finite(Q, "Q")
        check_finite(X, "X")


def _check_y(X, kq: int, power: str) -> None:
    check_positive_int(kq, "kq")
    if kq > X.shape[0]:
        raise ValueError(f"kq: expected at most n = {X.shape[0]} (X rows), got {kq}")
    if power not in _POWERS:
        raise ValueError(f"power: expected one of {_POWERS}, got {power!r}")


def _run_blocks(fn: Callable, Q, q_mask, block: int | None) -> tuple[jax.Array, jax.Array]:
    """Apply the jitted ``fn(Q_block, mask_block)`` to fixed-size blocks of queries."""
    block = default_query_block() if block is None else check_positive_int(block, "query_block")
    nq = Q.shape[0]
    block = min(block, nq)
    Q = jnp.asarray(Q)
    if q_mask is not None:
        q_mask = jnp.asarray(q_mask, bool)
    pad = -nq % block
    if pad:
        Q = jnp.pad(Q, ((0, pad),) + ((0, 0),) * (Q.ndim - 1))
        if q_mask is not None:
            q_mask = jnp.pad(q_mask, ((0, pad), (0, 0)))
    outs = [
        fn(Q[i : i + block], None if q_mask is None else q_mask[i : i + block])
        for i in range(0, nq + pad, block)
    ]
    return tuple(jnp.concatenate([o[j] for o in outs])[:nq] for j in range(2))


@partial(jax.jit, static_argnames=("kq", "power"))
def _y_block(Q, q_mask, X, gamma, *, kq, power):
    return _sparse_y(_similarities(Q, X, q_mask), kq, gamma, power)


def query_vector(
    Q: jax.Array,
    X: jax.Array,
    kq: int = 10,
    gamma: float = 3.0,
    *,
    q_mask: jax.Array | None = None,
    power: str = "before_sum",
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The sparse query vectors ``y`` (CVPR 2017, eqs. 7, 8; SPEC §8.2): ``(vals, ids) (nq, kq)``.

    ``y_i = Σ_{q ∈ Q} s_k(x_i|q)`` with ``s_k(x|q) = max(xᵀq, 0)^γ`` on the ``kq`` nearest
    neighbours of ``q``, then only the ``kq`` largest entries kept. ``power='after_sum'`` sums
    raw similarities and applies the power after the cut (the reference code).
    """
    _check_queries(Q, X, q_mask, validate)
    _check_y(X, kq, power)
    fn = partial(_y_block, X=jnp.asarray(X), gamma=float(gamma), kq=kq, power=power)
    return _run_blocks(fn, Q, q_mask, 64)


# ----------------------------------------------------------------------------- solvers


def _cg(op: Callable, b: jax.Array, iters: int, tol) -> jax.Array:
    """Conjugate gradient on the columns of ``b (n, m)`` from ``x₀ = 0`` (SPD ``op``).

    Each column stops when ``‖r‖ <= tol ‖b‖`` (scipy's ``rtol`` rule) or after ``iters``.
    """
    bb = jnp.sum(b * b, axis=0)
    thresh = tol**2 * bb

    def cond(state):
        i, _, _, _, rs = state
        return (i < iters) & jnp.any(rs > thresh)

    def body(state):
        i, x, r, p, rs = state
        active = rs > thresh
        ap = op(p)
        pap = jnp.sum(p * ap, axis=0)
        step = jnp.where(active, rs / jnp.where(active, pap, 1.0), 0.0)
        x = x + step * p
        r = r - step * ap
        rs_new = jnp.sum(r * r, axis=0)
        beta = jnp.where(active, rs_new / jnp.where(active, rs, 1.0), 0.0)
        p = jnp.where(active, r + beta * p, p)
        return i + 1, x, r, p, jnp.where(active, rs_new, rs)

    state = (0, jnp.zeros_like(b), b, b, bb)
    return lax.while_loop(cond, body, state)[1]


def _jacobi(op: Callable, b: jax.Array, iters: int, tol) -> jax.Array:
    """Jacobi iteration ``x ← x + (b − op(x))`` (= ``f ← αSf + (1 − α)y``) from ``x₀ = 0``."""
    thresh = tol**2 * jnp.sum(b * b, axis=0)

    def cond(state):
        i, _, r = state
        return (i < iters) & jnp.any(jnp.sum(r * r, axis=0) > thresh)

    def body(state):
        i, x, r = state
        x = x + r
        return i + 1, x, b - op(x)

    return lax.while_loop(cond, body, (0, jnp.zeros_like(b), b))[1]


def _solve(graph: Graph, y: jax.Array, alpha, iters: int, tol, solver: str) -> jax.Array:
    """``f ≈ (1 − α)(I − αS)^{-1} y`` for the columns of ``y (n, m)``."""
    apply_s = operator(graph)

    def op(v):
        return v - alpha * apply_s(v)

    fn = _cg if solver == "cg" else _jacobi
    return fn(op, (1.0 - alpha) * y, iters, tol)


@partial(jax.jit, static_argnames=("iters", "solver"))
def diffuse(
    graph: Graph,
    y: jax.Array,
    alpha: float = 0.99,
    iters: int = 20,
    tol: float = 1e-6,
    solver: str = "cg",
) -> jax.Array:
    """Diffusion ``f ≈ (1 − α)(I − αS)^{-1} y`` of dense query vectors ``y (nq, n)``. Jit-able.

    Conjugate gradient (Iscen et al., CVPR 2017, eq. 17; α = 0.99, 20 iterations, tol 1e-6) or,
    with ``solver='jacobi'``, the iteration ``f ← αSf + (1 − α)y`` (eq. 3 / 16). All queries are
    solved together (one batched CG, each column with its own step sizes and stopping test).

    Returns ``f (nq, n)`` float32.
    """
    check_ndim(y, "y", (2,), "query vectors (nq, n)")
    if y.shape[1] != graph.n:
        raise ValueError(f"y: expected {graph.n} columns (graph nodes), got shape {y.shape}")
    if solver not in _SOLVERS:
        raise ValueError(f"solver: expected one of {_SOLVERS}, got {solver!r}")
    return _solve(graph, jnp.asarray(y, jnp.float32).T, alpha, iters, tol, solver).T


# ----------------------------------------------------------------------------- ranking, pooling


def _rank(f: jax.Array, key: jax.Array, k: int, fallback: bool) -> tuple[jax.Array, jax.Array]:
    """Top ``k`` of ``f (b, m)``; with ``fallback`` the items with ``f <= 0`` follow by ``key``."""
    if not fallback:
        return lax.top_k(f, k)
    reached = f > 0
    _, a_ids = lax.top_k(jnp.where(reached, f, -jnp.inf), k)
    _, b_ids = lax.top_k(jnp.where(reached, -jnp.inf, key), k)
    n_reached = jnp.minimum(reached.sum(axis=1, keepdims=True), k)
    pos = jnp.arange(k)[None, :]
    tail = jnp.take_along_axis(b_ids, jnp.maximum(pos - n_reached, 0), axis=1)
    ids = jnp.where(pos < n_reached, a_ids, tail)
    return jnp.take_along_axis(f, ids, axis=1), ids


@flax.struct.dataclass
class ImagePooling:
    """Node scores pooled into image scores ``f(X) = Σ_j w_j f_{i_X(j)}`` (CVPR 2017, eq. 13).

    Attributes:
      node_image: ``(n,)`` int32 image id of every graph node (region).
      node_weights: ``(n,)`` float32 weight ``w_j`` of every node (1: sum pooling; GMP weights).
      n_images: static number of images ``N``.
    """

    node_image: jax.Array
    node_weights: jax.Array
    n_images: int = flax.struct.field(pytree_node=False)

    def scores(self, f: jax.Array) -> jax.Array:
        """Image scores ``(b, N)`` from node scores ``f (b, n)``."""
        pooled = jax.ops.segment_sum((f * self.node_weights).T, self.node_image, self.n_images)
        return pooled.T

    def key(self, sims: jax.Array) -> jax.Array:
        """Image fallback key ``(b, N)``: the best similarity over an image's nodes."""
        return jax.ops.segment_max(sims.T, self.node_image, self.n_images).T


def image_pooling(
    node_image: jax.Array,
    node_weights: jax.Array | None = None,
    n_images: int | None = None,
    validate: bool = True,
) -> ImagePooling:
    """An :class:`ImagePooling` (weights default to 1, ``n_images`` to ``max(node_image) + 1``)."""
    check_ndim(node_image, "node_image", (1,), "image id per node (n,)")
    check_integer(node_image, "node_image")
    n = np.shape(node_image)[0]
    if n_images is None:
        n_images = int(np.max(node_image)) + 1
    n_images = check_positive_int(n_images, "n_images")
    if node_weights is None:
        node_weights = np.ones(n, np.float32)
    check_ndim(node_weights, "node_weights", (1,), "pooling weight per node (n,)")
    if np.shape(node_weights)[0] != n:
        raise ValueError(f"node_weights: expected {n} entries, got {np.shape(node_weights)}")
    if validate:
        ni = np.asarray(node_image)
        if ni.min() < 0 or ni.max() >= n_images:
            raise ValueError(
                f"node_image: ids must lie in [0, {n_images}), got [{ni.min()}, {ni.max()}]"
            )
        check_finite(node_weights, "node_weights")
    return ImagePooling(
        jnp.asarray(node_image, jnp.int32), jnp.asarray(node_weights, jnp.float32), n_images
    )


def gmp_weights(regions: jax.Array, mask: jax.Array | None = None, lam: float = 1.0) -> jax.Array:
    """Generalized max pooling weights ``w = (ΦΦᵀ + λI)^{-1} 1`` per image (SPEC §2.7), λ = 1.

    Args:
      regions: ``(N, R, D)`` regional vectors ``Φ`` (rows) of ``N`` images.
      mask: optional ``(N, R)`` bool; padded regions get weight 0 and do not affect the others.
      lam: the regulariser λ > 0.

    Returns ``(N, R)`` float32 weights. Jit-able.
    """
    check_ndim(regions, "regions", (3,), "regional vectors (N, R, D)")
    check_floating(regions, "regions")
    if mask is None:
        mask = jnp.ones(regions.shape[:2], bool)
    phi = jnp.where(mask[..., None], regions, 0.0).astype(jnp.float32)
    gram = jnp.einsum("nrd,nsd->nrs", phi, phi) + lam * jnp.eye(regions.shape[1])
    return jnp.linalg.solve(gram, mask.astype(jnp.float32)[..., None])[..., 0]


def flatten_regions(regions, mask=None, weights=None) -> tuple[np.ndarray, ImagePooling]:
    """Graph nodes from padded regional vectors: ``nodes (n, D)`` and their :class:`ImagePooling`.

    ``regions (N, R, D)``, ``mask (N, R)`` and optional per-region ``weights (N, R)`` (e.g.
    :func:`gmp_weights`; default 1); the valid regions are listed image by image. Host-side
    (``n`` depends on the mask).
    """
    regions = np.asarray(regions)
    check_ndim(regions, "regions", (3,), "regional vectors (N, R, D)")
    mask = np.ones(regions.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    image = np.broadcast_to(np.arange(regions.shape[0])[:, None], mask.shape)
    w = None if weights is None else np.asarray(weights, np.float32)[mask]
    return regions[mask], image_pooling(image[mask].astype(np.int32), w, regions.shape[0])


# ----------------------------------------------------------------------------- online search


@dataclasses.dataclass(frozen=True)
class _Online:
    """Static settings of one online search: the scorer ``(state, yv, yi, key) -> f (b, n)``."""

    scorer: Callable
    kq: int
    k: int
    power: str
    fallback: bool


@partial(jax.jit, static_argnames=("spec",))
def _online_block(Q, q_mask, X, state, pooling, gamma, *, spec: _Online):
    """``y`` → scores → (pooling) → ranking for one block of queries."""
    sims = _similarities(Q, X, q_mask)
    yv, yi = _sparse_y(sims, spec.kq, gamma, spec.power)
    key = sims if sims.ndim == 2 else sims.max(axis=1)
    f = spec.scorer(state, yv, yi, key)
    if pooling is not None:
        f, key = pooling.scores(f), pooling.key(key)
    return _rank(f, key, spec.k, spec.fallback)


def _online(spec: _Online, state, n: int, Q, X, gamma, q_mask, pooling, query_block, validate):
    """Checks shared by the online searches, then :func:`_online_block` over query blocks."""
    _check_queries(Q, X, q_mask, validate)
    if X.shape[0] != n:
        raise ValueError(f"X: expected {n} rows (graph nodes), got shape {X.shape}")
    _check_y(X, spec.kq, spec.power)
    n_out = n
    if pooling is not None:
        if pooling.node_image.shape != (n,):
            raise ValueError(
                f"pooling: expected {n} nodes (graph nodes), got {pooling.node_image.shape[0]}"
            )
        n_out = pooling.n_images
    check_positive_int(spec.k, "k")
    if spec.k > n_out:
        raise ValueError(f"k: expected at most {n_out} (items ranked), got {spec.k}")
    fn = partial(
        _online_block, X=jnp.asarray(X), state=state, pooling=pooling, gamma=float(gamma), spec=spec
    )
    return _run_blocks(fn, Q, q_mask, query_block)


def _truncated(graph: Graph, yv, yi, key, truncate: int, alpha, iters, tol, solver):
    """Diffusion of one query on the re-normalised sub-graph of its ``truncate`` best nodes."""
    n = graph.n
    _, nodes = lax.top_k(key, truncate)
    sub = graph_lib.subgraph(graph, nodes)
    pos = jnp.full(n, -1, jnp.int32).at[nodes].set(jnp.arange(truncate, dtype=jnp.int32))
    local = pos[yi]
    y = (
        jnp.zeros(truncate, jnp.float32)
        .at[jnp.where(local >= 0, local, truncate)]
        .add(yv, mode="drop")
    )
    f = _solve(sub, y[:, None], alpha, iters, tol, solver)[:, 0]
    return jnp.zeros(n, jnp.float32).at[nodes].set(f)


@dataclasses.dataclass(frozen=True)
class _Diffusion:
    """Scorer of :func:`search`; state ``(graph, alpha, tol)``."""

    iters: int
    solver: str
    truncate: int | None

    def __call__(self, state, yv, yi, key):
        graph, alpha, tol = state
        if self.truncate is None:
            y = densify(yv, yi, graph.n).T
            return _solve(graph, y, alpha, self.iters, tol, self.solver).T
        one = partial(
            _truncated,
            graph,
            truncate=self.truncate,
            alpha=alpha,
            iters=self.iters,
            tol=tol,
            solver=self.solver,
        )
        return jax.vmap(one)(yv, yi, key)


def search(
    Q: jax.Array,
    X: jax.Array,
    graph: Graph,
    kq: int = 10,
    alpha: float = 0.99,
    iters: int = 20,
    tol: float = 1e-6,
    k: int = 100,
    *,
    gamma: float = 3.0,
    solver: str = "cg",
    truncate: int | None = None,
    q_mask: jax.Array | None = None,
    power: str = "before_sum",
    pooling: ImagePooling | None = None,
    fallback: bool = True,
    query_block: int | None = None,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Diffusion search end to end (Iscen et al., CVPR 2017): ``y`` → CG → ranking.

    Global: ``Q (nq, D)`` against the graph's nodes ``X (n, D)``. Regional: ``Q (nq, R, D)`` with
    ``q_mask``, ``y`` summed over the query regions (eq. 8); with ``pooling`` the node scores are
    pooled into image scores (eq. 13, e.g. GMP weights from :func:`flatten_regions`).

    Args:
      Q: queries ``(nq, D)`` or ``(nq, R, D)``, ℓ2-normalised like ``X``.
      X: ``(n, D)`` the descriptors the graph was built on.
      graph: a :class:`jret.graph.Graph` on ``X``.
      kq: query neighbours kept in ``y`` (10 global, 200 regional in the paper).
      alpha: α in (0, 1) (default 0.99).
      iters: maximum solver iterations (20 for CG; ≈ 110 for Jacobi to match CG).
      tol: relative residual tolerance (1e-6).
      k: results returned per query.
      gamma: similarity exponent of ``y`` (3, as the graph).
      solver: ``'cg'`` (default) or ``'jacobi'``.
      truncate: optional shortlist size: diffusion on the re-normalised sub-graph of each query's
        ``truncate`` most similar nodes (10k images in the paper at 100k scale).
      q_mask: ``(nq, R)`` valid query regions.
      power: ``'before_sum'`` (eq. 8, default) or ``'after_sum'`` (the reference code) for
        regional ``y``.
      pooling: optional :class:`ImagePooling` of node scores into image scores.
      fallback: unreached items follow by plain similarity (see the module docstring).
      query_block: queries processed together (default :func:`default_query_block`).
      validate: value checks (NaN/inf, empty inputs).

    Returns:
      ``scores (nq, k)`` (diffusion values) and ``ids (nq, k)`` int32 (node ids, or image ids
      when pooling).
    """
    alpha = _check_alpha(alpha)
    iters = check_positive_int(iters, "iters")
    if solver not in _SOLVERS:
        raise ValueError(f"solver: expected one of {_SOLVERS}, got {solver!r}")
    if truncate is not None:
        truncate = check_positive_int(truncate, "truncate")
        if not kq <= truncate <= graph.n:
            raise ValueError(
                f"truncate: expected kq = {kq} <= truncate <= n = {graph.n}, got {truncate}"
            )
    spec = _Online(_Diffusion(iters, solver, truncate), kq, k, power, bool(fallback))
    state = (graph, alpha, float(tol))
    return _online(spec, state, graph.n, Q, X, gamma, q_mask, pooling, query_block, validate)


# ----------------------------------------------------------------------------- seeded diffusion


@partial(jax.jit, static_argnames=("n_seeds", "kq", "k", "iters"))
def _seeded_jit(graph, ids, inliers, sims, key, alpha, tol, *, n_seeds, kq, k, iters):
    ids, inliers, sims = ids[:, :n_seeds], inliers[:, :n_seeds], sims[:, :n_seeds]
    inliers = inliers.astype(jnp.float32)
    top = inliers.max(axis=1, keepdims=True)
    y1 = jnp.where(top > 0, inliers / jnp.where(top > 0, top, 1.0), 0.0)
    vals, pos = lax.top_k(y1 * sims, min(kq, ids.shape[1]))
    rows = jnp.arange(ids.shape[0])[:, None]
    y = jnp.zeros_like(y1).at[rows, pos].set(vals)
    y = jnp.where(jnp.any(y != 0, axis=1, keepdims=True), y, y1)
    f = _solve(graph, densify(y, ids, graph.n).T, alpha, iters, tol, "cg").T
    return _rank(f, key, k, True)


def seeded(
    graph: Graph,
    ids: jax.Array,
    inliers: jax.Array,
    sims: jax.Array,
    kq: int = 5,
    alpha: float = 0.99,
    iters: int = 20,
    tol: float = 1e-6,
    k: int = 100,
    *,
    n_seeds: int = 10,
    ref_compat: bool = False,
    fallback_scores: jax.Array | None = None,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Diffusion initiated from spatially verified images (DSM, CVPR 2019, §4.1; SPEC §8.9).

    Of the ``n_seeds = 10`` top images of the spatially re-ranked list, the score
    ``y = (inliers / max inliers) × global similarity`` is formed and its ``kq = 5`` largest
    entries start the diffusion (``ref_compat=True`` keeps ``kq − 1``, as the reference code);
    when all of them are zero the normalised inlier counts are used instead.

    Args:
      graph: the kNN graph of the database global descriptors.
      ids: ``(nq, m)`` database ids of the spatially re-ranked list, best first (``m >= 1``).
      inliers: ``(nq, m)`` inlier counts of those images (0 for unverified).
      sims: ``(nq, m)`` global descriptor similarities ``qᵀx`` of those images.
      kq, alpha, iters, tol: as :func:`search` (CG).
      k: results returned per query.
      n_seeds: head of the list the seeds are taken from (10).
      ref_compat: keep ``kq − 1`` seeds as the reference implementation does.
      fallback_scores: optional ``(nq, n)`` scores (e.g. ``Q Xᵀ``) ordering the items the
        diffusion does not reach; without it they follow by increasing id.
      validate: value checks (id ranges, NaN/inf).

    Returns ``scores (nq, k)`` and ``ids (nq, k)`` int32.
    """
    for name, a in (("ids", ids), ("inliers", inliers), ("sims", sims)):
        check_ndim(a, name, (2,), f"{name} (nq, m)")
    if not np.shape(ids) == np.shape(inliers) == np.shape(sims):
        raise ValueError(
            f"ids, inliers, sims: expected the same shape (nq, m), got {np.shape(ids)}, "
            f"{np.shape(inliers)}, {np.shape(sims)}"
        )
    check_integer(ids, "ids")
    check_floating(sims, "sims")
    n_seeds = check_positive_int(n_seeds, "n_seeds")
    kq = check_positive_int(kq, "kq") - (1 if ref_compat else 0)
    if kq < 1:
        raise ValueError("kq: ref_compat keeps kq - 1 seeds, so kq must be at least 2")
    check_positive_int(k, "k")
    if k > graph.n:
        raise ValueError(f"k: expected at most n = {graph.n}, got {k}")
    if validate:
        check_nonempty(ids, "ids", axis=1)
        i = np.asarray(ids)
        if i.size and (i.min() < 0 or i.max() >= graph.n):
            raise ValueError(f"ids: expected database ids in [0, {graph.n})")
        check_finite(sims, "sims")
        check_finite(inliers, "inliers")
    if fallback_scores is None:
        key = jnp.zeros((np.shape(ids)[0], graph.n), jnp.float32)
    else:
        if np.shape(fallback_scores) != (np.shape(ids)[0], graph.n):
            raise ValueError(
                f"fallback_scores: expected shape {(np.shape(ids)[0], graph.n)}, "
                f"got {np.shape(fallback_scores)}"
            )
        key = jnp.asarray(fallback_scores, jnp.float32)
    return _seeded_jit(
        graph,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(inliers),
        jnp.asarray(sims, jnp.float32),
        key,
        _check_alpha(alpha),
        float(tol),
        n_seeds=n_seeds,
        kq=kq,
        k=k,
        iters=check_positive_int(iters, "iters"),
    )


# ----------------------------------------------------------------------------- eigenpairs


@dataclasses.dataclass(frozen=True)
class EigOptions:
    """Settings of the eigensolvers behind :func:`fsr_fit` and :func:`hybrid_fit` (SPEC §8.6).

    Attributes:
      oversample: ``p`` of the randomised range finder (default ``⌈0.1 r⌉``).
      power_iters: ``q`` of the range finder (3).
      lanczos_steps: Krylov dimension of Lanczos (default ``3 r + 50``).
      exact_max: largest block that ``method='auto'`` decomposes exactly (dense ``eigh``).
    """

    oversample: int | None = None
    power_iters: int = 3
    lanczos_steps: int | None = None
    exact_max: int = 4096

    def __post_init__(self):
        check_positive_int(self.power_iters, "power_iters")
        check_positive_int(self.exact_max, "exact_max")
        p = self.oversample
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0):
            raise ValueError(f"oversample: expected a non-negative integer, got {p!r}")
        if self.lanczos_steps is not None:
            check_positive_int(self.lanczos_steps, "lanczos_steps")


def _orthonormalize(B: jax.Array) -> jax.Array:
    """Orthonormal basis of the columns of ``B (n, m)`` by Cholesky QR, twice (matmuls only).

    A small relative shift keeps the factorisations defined on nearly dependent columns; the
    second pass restores orthogonality (to about 1e-6).
    """
    for shift in (1e-5, 1e-7):
        G = B.T @ B
        G = G + shift * jnp.trace(G) / G.shape[0] * jnp.eye(G.shape[0], dtype=G.dtype)
        R = jnp.linalg.cholesky(G)
        B = jax.scipy.linalg.solve_triangular(R, B.T, lower=True).T
    return B


@partial(jax.jit, static_argnames=("r_hat", "power_iters"))
def _range_basis(graph: Graph, key, r_hat: int, power_iters: int):
    """FSR.APPROX stage 1 and 2(a) (CVPR 2018, §3.1): the basis ``Q (n, r̂)`` by simultaneous
    iteration from a Gaussian ``B⁽⁰⁾`` (``q`` products ``B⁽ᵗ⁺¹⁾ = S Q⁽ᵗ⁾``) and ``C = QᵀSQ``."""
    apply_s = operator(graph)
    Qm = _orthonormalize(jax.random.normal(key, (graph.n, r_hat), jnp.float32))
    for _ in range(power_iters - 1):
        Qm = _orthonormalize(apply_s(Qm))
    C = Qm.T @ apply_s(Qm)
    return Qm, 0.5 * (C + C.T)


@partial(jax.jit, static_argnames=("steps",))
def _lanczos_basis(graph: Graph, key, steps: int):
    """``steps`` Lanczos steps on ``S`` with full re-orthogonalisation: the basis ``V (steps, n)``
    and the tridiagonal ``T``'s diagonal ``a`` and off-diagonal ``b``.

    On a breakdown (an invariant subspace) the next vector is a fresh random one orthogonalised
    against the basis.
    """
    n = graph.n
    apply_s = operator(graph)

    def orth(w, V):
        w = w - V.T @ (V @ w)
        return w - V.T @ (V @ w)

    def body(j, carry):
        V, a, b, v, v_prev, beta = carry
        V = V.at[j].set(v)
        w = apply_s(v)
        aj = w @ v
        w = orth(w - aj * v - beta * v_prev, V)
        bj = jnp.linalg.norm(w)

        def restart(_):
            fresh = orth(jax.random.normal(jax.random.fold_in(key, j + 1), (n,)), V)
            return fresh / jnp.linalg.norm(fresh), 0.0

        nxt, bj = lax.cond(bj <= 1e-6, restart, lambda _: (w / bj, bj), None)
        return V, a.at[j].set(aj), b.at[j].set(bj), nxt, v, bj

    v0 = jax.random.normal(key, (n,), jnp.float32)
    V = jnp.zeros((steps, n), jnp.float32)
    init = (V, jnp.zeros(steps), jnp.zeros(steps), v0 / jnp.linalg.norm(v0), jnp.zeros(n), 0.0)
    V, a, b, *_ = lax.fori_loop(0, steps, body, init)
    return V, a, b


def _block_eigenpairs(graph, csr, nodes, r, method, opts: EigOptions, key):
    """Top ``r`` eigenpairs ``(U_l (n_l, r), λ (r,))``, decreasing, of the block of ``S`` on
    ``nodes``."""
    n_l = len(nodes)
    if method == "exact" or (method == "auto" and n_l <= opts.exact_max):
        block = csr[nodes][:, nodes].toarray().astype(np.float64)
        lam, V = scipy.linalg.eigh(block, subset_by_index=(n_l - r, n_l - 1))
        return V[:, ::-1], lam[::-1]
    sub = graph_lib.subgraph(graph, jnp.asarray(nodes, jnp.int32))
    if method == "lanczos":
        steps = max(r, min(n_l, opts.lanczos_steps or 3 * r + 50))
        V, a, b = _lanczos_basis(sub, key, steps)
        lam, Y = scipy.linalg.eigh_tridiagonal(
            np.asarray(a, np.float64), np.asarray(b, np.float64)[:-1]
        )
        basis = V.T
    else:
        p = opts.oversample if opts.oversample is not None else math.ceil(0.1 * r)
        basis, C = _range_basis(sub, key, min(n_l, r + p), opts.power_iters)
        lam, Y = np.linalg.eigh(np.asarray(C, np.float64))
    lam, Y = lam[::-1][:r], Y[:, ::-1][:, :r]
    return np.asarray(basis @ jnp.asarray(Y, jnp.float32), np.float64), lam


def _select(blocks, rank: int | None, rho: int, components: str) -> list[np.ndarray]:
    """Slices kept per block: all (``rank=None``); the top ``rank`` ('largest'); or, per
    CVPR 2018 §7, up to ``ρ`` from each block, completed up to ``rank`` in total by the
    largest remaining eigenvalues [JRET reading]."""
    sizes = [len(lam) for _, lam in blocks]
    if rank is None:
        return [np.arange(s) for s in sizes]
    if components == "largest":
        return [np.arange(min(rank, s)) for s in sizes]
    kept = [np.arange(min(rho, s)) for s in sizes]
    rest = [
        (lam[j], b, j)
        for b, (_, lam) in enumerate(blocks)
        for j in range(min(rho, len(lam)), len(lam))
    ]
    budget = rank - sum(len(k) for k in kept)
    extra = sorted(rest, key=lambda t: -t[0])[: max(budget, 0)]
    for _, b, j in extra:
        kept[b] = np.append(kept[b], j)
    return kept


def _decompose(graph: Graph, rank, method, components, rho, opts: EigOptions, key):
    """Eigenpairs ``U (n, r), λ (r,)``, nodes covered and isolated nodes (SPEC §8.6)."""
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if components not in _COMPONENTS:
        raise ValueError(f"components: expected one of {_COMPONENTS}, got {components!r}")
    if rank is not None:
        rank = check_positive_int(rank, "rank")
    rho = check_positive_int(rho, "rho")
    key = jax.random.key(0) if key is None else key
    n = graph.n
    _, labels = graph_lib.connected_components(graph)
    labels = np.asarray(labels)
    sizes = np.bincount(labels)
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1])
    if components == "largest":
        chosen = [int(np.argmax(sizes))]
    else:
        chosen = [c for c in range(len(sizes)) if sizes[c] > 1]
    csr = graph_lib.to_scipy(graph)
    keys = jax.random.split(key, max(len(chosen), 1))
    blocks = []
    for c, ckey in zip(chosen, keys, strict=False):
        n_l = int(sizes[c])
        if rank is None or components == "largest":
            r_l = n_l if rank is None else min(rank, n_l)
        else:
            r_l = n_l if n_l <= rho else min(n_l, max(rho, math.ceil(rank * n_l / n)))
        blocks.append(_block_eigenpairs(graph, csr, members[c], r_l, method, opts, ckey))
    kept = _select(blocks, rank, rho, components)
    total = sum(len(k) for k in kept)
    U = np.zeros((n, total), np.float32)
    lam = np.zeros(total, np.float32)
    covered = np.zeros(n, bool)
    col = 0
    for c, (Ub, lb), sel in zip(chosen, blocks, kept, strict=True):
        nodes = members[c]
        U[np.ix_(nodes, np.arange(col, col + len(sel)))] = Ub[:, sel]
        lam[col : col + len(sel)] = lb[sel]
        covered[nodes] = len(sel) > 0
        col += len(sel)
    order = np.argsort(-lam, kind="stable")
    isolated = np.zeros(n, bool)
    if components == "all":
        isolated = sizes[labels] == 1
    return U[:, order], lam[order], covered, isolated


def _sparsify(U: np.ndarray, keep: int) -> np.ndarray:
    """Keep the ``keep`` largest-magnitude entries of ``U`` and zero the rest (FSR stage 3)."""
    if keep >= U.size:
        return U
    flat = np.abs(U).ravel()
    cut = np.argpartition(flat, U.size - keep)[: U.size - keep]
    out = U.copy().ravel()
    out[cut] = 0.0
    return out.reshape(U.shape)


# ----------------------------------------------------------------------------- FSR


@flax.struct.dataclass
class FSRModel:
    """Offline part of fast spectral ranking: ``U (n, r)``, ``lam (r,)`` (decreasing), the nodes
    ``covered (n,)`` by the eigenpairs, the ``isolated (n,)`` nodes handled exactly, and α."""

    U: jax.Array
    lam: jax.Array
    covered: jax.Array
    isolated: jax.Array
    alpha: float = flax.struct.field(pytree_node=False, default=0.99)


def fsr_fit(
    graph: Graph,
    rank: int | None = 1000,
    alpha: float = 0.99,
    *,
    method: str = "auto",
    components: str = "all",
    rho: int = 50,
    tau: int | None = None,
    options: EigOptions = EigOptions(),
    key: jax.Array | None = None,
) -> FSRModel:
    """Offline FSR (Iscen et al., CVPR 2018, §3.1, §7): a rank-``r`` eigendecomposition of ``S``.

    Per connected component (``components='all'``): a block of ``n_l <= ρ`` nodes is decomposed
    exactly, a larger one to rank ``r_l = max(ρ, ⌈r n_l / n⌉)``; up to ``ρ`` slices are kept
    from each block and completed with the largest remaining eigenvalues up to ``r`` in total;
    isolated nodes are exact (``x_i = h(0) y_i``). ``components='largest'`` decomposes only the
    largest component and copies ``x_i := y_i`` elsewhere (the paper's APPROX experiments).

    Args:
      graph: the kNN graph.
      rank: ``r``, eigenpairs kept (paper optimum about 1k; 100 on Paris6k); None = full rank.
      alpha: α of the default transfer function ``h_α`` (0.99).
      method: ``'exact'`` (dense ``eigh``), ``'approx'`` (randomised range finder + Rayleigh–Ritz,
        FSR.APPROX), ``'lanczos'`` (FSR.RANK-r) or ``'auto'`` (exact for blocks up to
        ``options.exact_max`` nodes, approx above).
      components: ``'all'`` or ``'largest'``.
      rho: ``ρ`` of the per-component rule (50).
      tau: FSR.SPARSE: keep the ``τ`` largest-magnitude entries of ``U`` (None: dense).
      options: :class:`EigOptions` of the eigensolvers.
      key: PRNG key of the randomised methods (default ``jax.random.key(0)``).
    """
    alpha = _check_alpha(alpha)
    U, lam, covered, isolated = _decompose(graph, rank, method, components, rho, options, key)
    if tau is not None:
        U = _sparsify(U, check_positive_int(tau, "tau"))
    return FSRModel(
        U=jnp.asarray(U),
        lam=jnp.asarray(lam),
        covered=jnp.asarray(covered),
        isolated=jnp.asarray(isolated),
        alpha=alpha,
    )


@dataclasses.dataclass(frozen=True)
class _FSR:
    """Scorer of :func:`fsr_search`; state: the :class:`FSRModel`. ``x = U h(Λ) Uᵀ y`` (eq. 4)."""

    h: Callable | None
    fsrw: bool

    def __call__(self, model: FSRModel, yv, yi, key):
        h = self.h or h_alpha(model.alpha)
        z = jnp.einsum("bq,bqr->br", yv, model.U[yi])
        x = (z * h(model.lam)) @ model.U.T
        y = densify(yv, yi, model.U.shape[0])
        x = jnp.where(model.covered, x, jnp.where(model.isolated, h(jnp.zeros(())) * y, y))
        if self.fsrw:
            x = x + (1.0 - jnp.linalg.norm(model.U, axis=1)) * key
        return x


def fsr_search(
    model: FSRModel,
    Q: jax.Array,
    X: jax.Array,
    kq: int = 10,
    k: int = 100,
    *,
    h: Callable[[jax.Array], jax.Array] | None = None,
    fsrw: bool = False,
    gamma: float = 3.0,
    q_mask: jax.Array | None = None,
    power: str = "before_sum",
    pooling: ImagePooling | None = None,
    fallback: bool = True,
    query_block: int | None = None,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Online FSR (CVPR 2018, eq. 4): ``x = U h(Λ) Uᵀ y``, then ranking.

    ``h`` is any transfer function applied elementwise to the eigenvalues (a hashable callable,
    non-decreasing on the spectrum so that truncation keeps the largest ``|h(λ)|``); default
    ``h_α`` with the model's α. ``fsrw=True`` is FSRw (§7, eq. 13):
    ``x_i + (1 − η_i) x_iᵀq`` with ``η_i = ‖U_i‖`` (global queries only). Other arguments as
    :func:`search`.

    Returns ``scores (nq, k)`` and ``ids (nq, k)`` int32.
    """
    if fsrw and np.ndim(Q) == 3:
        raise ValueError("fsrw: FSRw is defined for global queries (nq, D) only")
    spec = _Online(_FSR(h, bool(fsrw)), kq, k, power, bool(fallback))
    n = model.U.shape[0]
    return _online(spec, model, n, Q, X, gamma, q_mask, pooling, query_block, validate)


# ----------------------------------------------------------------------------- hybrid


@flax.struct.dataclass
class HybridModel:
    """Offline part of hybrid spectral–temporal filtering: the graph, the top eigenpairs
    ``U (n, r)``, ``lam (r,)`` and α."""

    graph: Graph
    U: jax.Array
    lam: jax.Array
    alpha: float = flax.struct.field(pytree_node=False, default=0.99)


def hybrid_fit(
    graph: Graph,
    rank: int = 400,
    alpha: float = 0.99,
    *,
    method: str = "auto",
    components: str = "largest",
    sparsity: float | None = None,
    options: EigOptions = EigOptions(),
    key: jax.Array | None = None,
) -> HybridModel:
    """Offline hybrid filtering (Iscen et al., ACCV 2018, §4, §6): top ``r = 400`` eigenpairs.

    Eigenpairs of the largest connected component (``components='largest'``, as the paper;
    ``'all'`` applies FSR's per-component rule). ``sparsity`` (e.g. 0.99, SHybrid) zeroes that
    fraction of the smallest-magnitude entries of ``U₁``. Other arguments as :func:`fsr_fit`.
    """
    alpha = _check_alpha(alpha)
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: expected a fraction in [0, 1), got {sparsity!r}")
    U, lam, _, _ = _decompose(graph, rank, method, components, 50, options, key)
    if sparsity is not None:
        U = _sparsify(U, max(1, round((1 - sparsity) * U.size)))
    return HybridModel(graph=graph, U=jnp.asarray(U), lam=jnp.asarray(lam), alpha=alpha)


@dataclasses.dataclass(frozen=True)
class _Hybrid:
    """Scorer of :func:`hybrid_search`; state ``(model, tol)`` (ACCV 2018, Theorem 1)."""

    iters: int

    def __call__(self, state, yv, yi, key):
        model, tol = state
        a, U, lam = model.alpha, model.U, model.lam
        y = densify(yv, yi, U.shape[0]).T
        g = (1.0 - a) * a * lam / (1.0 - a * lam)
        x_s = U @ (g[:, None] * (U.T @ y))
        apply_s = operator(model.graph)

        def op(z):
            return (z - a * (apply_s(z) - U @ (lam[:, None] * (U.T @ z)))) / (1.0 - a)

        return (x_s + _cg(op, y, self.iters, tol)).T


def hybrid_search(
    model: HybridModel,
    Q: jax.Array,
    X: jax.Array,
    kq: int = 5,
    k: int = 100,
    *,
    iters: int = 5,
    tol: float = 1e-6,
    gamma: float = 3.0,
    q_mask: jax.Array | None = None,
    power: str = "before_sum",
    pooling: ImagePooling | None = None,
    fallback: bool = True,
    query_block: int | None = None,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Online hybrid spectral–temporal filtering (ACCV 2018, Theorem 1, §6.1).

    Spectral part ``U₁ g_α(Λ₁) U₁ᵀ y`` plus ``iters = 5`` CG iterations on the residual system
    with the matrix-free operator ``z ↦ (z − α(Sz − U₁(Λ₁(U₁ᵀz))))/(1 − α)``; ``y`` from the
    ``kq = 5`` nearest neighbours (the paper's setting). Other arguments as :func:`search`.

    Returns ``scores (nq, k)`` and ``ids (nq, k)`` int32.
    """
    spec = _Online(_Hybrid(check_positive_int(iters, "iters")), kq, k, power, bool(fallback))
    state = (model, float(tol))
    return _online(spec, state, model.graph.n, Q, X, gamma, q_mask, pooling, query_block, validate)


# ----------------------------------------------------------------------------- save / load


def save(model: FSRModel | HybridModel, path: str | os.PathLike) -> None:
    """Save an :class:`FSRModel` or :class:`HybridModel` (npz, versioned, atomic write)."""
    if not isinstance(model, (FSRModel, HybridModel)):
        raise ValueError(
            f"model: expected an FSRModel or a HybridModel, got {type(model).__name__}"
        )
    arrays = {"U": np.asarray(model.U), "lam": np.asarray(model.lam), "alpha": model.alpha}
    if isinstance(model, FSRModel):
        arrays |= {"covered": np.asarray(model.covered), "isolated": np.asarray(model.isolated)}
        graph_lib.write_npz(path, "fsr", arrays)
    else:
        arrays |= graph_lib.graph_arrays(model.graph, prefix="graph_")
        graph_lib.write_npz(path, "hybrid", arrays)


def load(path: str | os.PathLike) -> FSRModel | HybridModel:
    """Load a model written by :func:`save`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a corrupt one.
    """
    kind, arrays = graph_lib.read_npz(path, ("fsr", "hybrid"))

    def get(key: str) -> np.ndarray:
        return graph_lib.npz_field(arrays, key, path)

    U, lam, alpha = get("U"), get("lam"), float(get("alpha"))
    if U.ndim != 2 or lam.shape != (U.shape[1],):
        raise ValueError(f"{path}: corrupt model, U {U.shape} and lam {lam.shape} disagree")
    if kind == "fsr":
        covered, isolated = get("covered"), get("isolated")
        if covered.shape != (U.shape[0],) or isolated.shape != (U.shape[0],):
            raise ValueError(f"{path}: corrupt model, node masks do not match U {U.shape}")
        return FSRModel(
            U=jnp.asarray(U),
            lam=jnp.asarray(lam),
            covered=jnp.asarray(covered, bool),
            isolated=jnp.asarray(isolated, bool),
            alpha=alpha,
        )
    graph = graph_lib.graph_from_arrays(arrays, path, prefix="graph_")
    if graph.n != U.shape[0]:
        raise ValueError(f"{path}: corrupt model, graph of {graph.n} nodes and U {U.shape}")
    return HybridModel(graph=graph, U=jnp.asarray(U), lam=jnp.asarray(lam), alpha=alpha)
