"""k-nearest-neighbour graphs of a database for diffusion (SPEC §8.1).

Affinity of the regional diffusion / FSR / hybrid papers (Iscen et al., CVPR 2017, eqs. 1, 2, 5, 6;
Iscen et al., CVPR 2018, §2.3; Iscen et al., ACCV 2018, §3): ``s(x, z) = max(xᵀz, 0)^γ`` with
``γ = 3``, edges restricted to the ``k = 50`` nearest neighbours, kept only when the two points are
*mutual* neighbours, ``a_ij = min(s_k(x_i|x_j), s_k(x_j|x_i))``; zero diagonal (a point is not its
own neighbour); symmetric normalisation ``S = D^{-1/2} A D^{-1/2}`` with ``D = diag(A 1)`` and
``0/0 := 0`` for isolated nodes. With ``mutual=False`` the directed kNN affinity ``A`` is
symmetrised by the union ``W = A + Aᵀ`` (LP-DSSL, SPEC §8.1).

A :class:`Graph` is a pytree of padded neighbour lists ``(n, k)``: neighbour ids, the unnormalised
affinities ``A`` (kept so that a sub-graph can be re-normalised, SPEC §8.4), the normalised weights
``S`` and a validity mask. A padded slot points to its own row and holds zero weights. With
mutual edges the lists are symmetric (``j`` in row ``i`` iff ``i`` in row ``j``, same weight),
so ``S f`` is one gather per neighbour slot; with the union the lists are directed and ``S f``
adds the transposed product (a scatter).

The exact kNN search is :func:`jret.search.knn_chunked` (memory bounded by the chunk sizes) or,
with a ``mesh``, :func:`jret.search.knn_sharded` with the database rows split over the devices.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from jax import lax
from jax.experimental import sparse as jsparse
from jax.sharding import Mesh

from jret._checks import (
    check_finite,
    check_floating,
    check_integer,
    check_ndim,
    check_nonempty,
    check_positive_int,
)
from jret.search import DEFAULT_CHUNK_SIZE, knn_chunked, knn_sharded

FORMAT_VERSION = 1
DEFAULT_QUERY_CHUNK = 1024
_MUTUAL_BATCH = 1024


@flax.struct.dataclass
class Graph:
    """Padded neighbour lists of a weighted undirected graph on ``n`` nodes.

    Attributes:
      ids: ``(n, k)`` int32 neighbour ids; a padded slot holds its own row index.
      affinity: ``(n, k)`` float32 unnormalised affinities ``a_ij`` (0 in padded slots).
      weights: ``(n, k)`` float32 normalised weights ``a_ij / sqrt(d_i d_j)``.
      mask: ``(n, k)`` bool, True for an edge.
      mutual: static; True when the lists are symmetric (mutual kNN), False for directed lists
        whose symmetric matrix is ``W = A + Aᵀ``.
    """

    ids: jax.Array
    affinity: jax.Array
    weights: jax.Array
    mask: jax.Array
    mutual: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def n(self) -> int:
        return self.ids.shape[0]


def _row_index(ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(ids.shape[0], dtype=ids.dtype)[:, None], ids.shape)


def degrees(ids: jax.Array, affinity: jax.Array, mutual: bool = True) -> jax.Array:
    """Degrees ``d = W 1`` ``(n,)`` of the symmetric matrix the lists stand for."""
    d = affinity.sum(axis=1)
    if mutual:
        return d
    return d + jax.ops.segment_sum(affinity.ravel(), ids.ravel(), num_segments=ids.shape[0])


def from_affinity(
    ids: jax.Array, affinity: jax.Array, mask: jax.Array, mutual: bool = True
) -> Graph:
    """A :class:`Graph` from padded lists, normalised as ``S = D^{-1/2} W D^{-1/2}`` (0/0 := 0).

    Masked slots are reset to self-loops of zero weight. Jit-able.

    Args:
      ids: ``(n, k)`` integer neighbour ids in ``[0, n)``.
      affinity: ``(n, k)`` non-negative affinities ``a_ij``.
      mask: ``(n, k)`` bool, True for an edge.
      mutual: whether the lists are symmetric (see :class:`Graph`).
    """
    check_ndim(ids, "ids", (2,), "neighbour ids (n, k)")
    check_integer(ids, "ids")
    check_floating(affinity, "affinity")
    if np.shape(affinity) != np.shape(ids) or np.shape(mask) != np.shape(ids):
        raise ValueError(
            f"ids, affinity and mask: expected the same shape (n, k), got {np.shape(ids)}, "
            f"{np.shape(affinity)} and {np.shape(mask)}"
        )
    mask = jnp.asarray(mask, bool)
    ids = jnp.where(mask, ids, _row_index(ids)).astype(jnp.int32)
    affinity = jnp.where(mask, affinity, 0.0).astype(jnp.float32)
    d = degrees(ids, affinity, mutual)
    dinv = jnp.where(d > 0, lax.rsqrt(jnp.where(d > 0, d, 1.0)), 0.0)
    weights = affinity * (dinv[:, None] * dinv[ids])
    return Graph(ids=ids, affinity=affinity, weights=weights, mask=mask, mutual=mutual)


def operator(graph: Graph) -> Callable[[jax.Array], jax.Array]:
    """The linear map ``f ↦ S f`` for ``f (n,)`` or a block of vectors ``f (n, b)``. Jit-able.

    The lists are laid out slot-major once, here, so that repeated products (CG, Lanczos) gather
    contiguous slices; build the operator outside the loop that applies it. Mutual lists: one
    gather per neighbour slot; union lists add the transposed product (a scatter).
    """
    ids, w = graph.ids.T, graph.weights.T

    def apply(f: jax.Array) -> jax.Array:
        f = jnp.asarray(f)
        ws = w if f.ndim == 1 else w[..., None]

        def slot(s, acc):
            acc = acc + ws[s] * f[ids[s]]
            if graph.mutual:
                return acc
            return acc.at[ids[s]].add(ws[s] * f)

        return lax.fori_loop(0, ids.shape[0], slot, jnp.zeros_like(f))

    return apply


def matvec(graph: Graph, f: jax.Array) -> jax.Array:
    """``S f`` for ``f (n,)`` or ``f (n, b)`` (see :func:`operator`). Jit-able."""
    return operator(graph)(f)


def _drop_self(scores: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """From ``k + 1`` neighbours per row, drop the row's own id (else the last neighbour)."""
    is_self = ids == _row_index(ids)
    order = jnp.argsort(is_self, axis=1, stable=True)[:, :k]
    return jnp.take_along_axis(scores, order, 1), jnp.take_along_axis(ids, order, 1)


def _mutual_affinity(ids: jax.Array, sim: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a_ij = min(s(i|j), s(j|i))`` and whether ``i`` is in ``j``'s list, per slot ``(n, k)``."""
    n = ids.shape[0]

    def row(args):
        i, nbrs = args
        match = ids[nbrs] == i
        back = jnp.max(jnp.where(match, sim[nbrs], -jnp.inf), axis=1)
        return back, match.any(axis=1)

    back, found = lax.map(row, (jnp.arange(n, dtype=ids.dtype), ids), batch_size=_MUTUAL_BATCH)
    return jnp.where(found, jnp.minimum(sim, back), 0.0), found


@partial(jax.jit, static_argnames=("k", "mutual"))
def _finish(scores: jax.Array, ids: jax.Array, k: int, gamma, mutual: bool) -> Graph:
    scores, ids = _drop_self(scores, ids, k)
    sim = jnp.maximum(scores, 0.0) ** gamma
    if mutual:
        affinity, found = _mutual_affinity(ids, sim)
        mask = found & (affinity > 0)
    else:
        affinity, mask = sim, sim > 0
    return from_affinity(ids, affinity, mask, mutual)


@partial(jax.jit, static_argnames=("k", "chunk_size", "query_chunk_size"))
def _self_knn(X, k, chunk_size, query_chunk_size):
    return knn_chunked(X, X, k, chunk_size, min(query_chunk_size, X.shape[0]))


def _check_graph_inputs(X, k: int, gamma: float, validate: bool) -> int:
    check_ndim(X, "X", (2,), "descriptors (n, D)")
    check_floating(X, "X")
    if validate:
        check_nonempty(X, "X")
        check_finite(X, "X")
    k = check_positive_int(k, "k")
    if k >= X.shape[0]:
        raise ValueError(f"k: expected at most n - 1 = {X.shape[0] - 1} (X rows - 1), got {k}")
    if not np.isscalar(gamma) or not gamma > 0:
        raise ValueError(f"gamma: expected a positive number, got {gamma!r}")
    return k


def knn_graph(
    X: jax.Array,
    k: int = 50,
    gamma: float = 3.0,
    mutual: bool = True,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK,
    mesh: Mesh | None = None,
    axis_name: str = "db",
    validate: bool = True,
) -> Graph:
    """The kNN graph of the descriptors ``X (n, D)`` (Iscen et al., CVPR 2017, eqs. 1, 2, 5, 6).

    Exact inner-product search of the ``k + 1`` nearest neighbours of every row (itself among
    them, then dropped), similarities ``max(xᵢᵀxⱼ, 0)^γ`` (negative ones clipped to 0), mutual
    filtering ``a_ij = min(s_k(xᵢ|xⱼ), s_k(xⱼ|xᵢ))`` (or the union ``W = A + Aᵀ`` with
    ``mutual=False``), zero diagonal, ``S = D^{-1/2} W D^{-1/2}``. Defaults of the papers:
    ``k = 50`` (global descriptors; 200 for regional ones), ``γ = 3``, mutual.

    Args:
      X: ``(n, D)`` floating descriptors, normally ℓ2-normalised.
      k: neighbours per node, ``1 <= k < n``.
      gamma: similarity exponent ``γ > 0``.
      mutual: keep only mutual neighbours (default) or symmetrise by the union.
      chunk_size: database rows per chunk of the kNN search.
      query_chunk_size: rows searched at a time (memory ``query_chunk_size × chunk_size``).
      mesh: optional ``jax.sharding.Mesh``: the search runs with the rows of ``X`` sharded over
        its axis ``axis_name`` (:func:`jret.search.knn_sharded`).
      axis_name: the mesh axis (default ``"db"``).
      validate: check ``X`` for emptiness and NaN/inf first.

    Returns:
      a :class:`Graph` with ``(n, k)`` lists.
    """
    k = _check_graph_inputs(X, k, gamma, validate)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    query_chunk_size = check_positive_int(query_chunk_size, "query_chunk_size")
    if mesh is None:
        scores, ids = _self_knn(jnp.asarray(X), k + 1, chunk_size, query_chunk_size)
    else:
        parts = [
            knn_sharded(
                X[i : i + query_chunk_size], X, k + 1, mesh, axis_name, chunk_size, validate=False
            )
            for i in range(0, X.shape[0], query_chunk_size)
        ]
        scores = jnp.concatenate([p[0] for p in parts])
        ids = jnp.concatenate([p[1] for p in parts])
    return _finish(scores, ids, k, float(gamma), bool(mutual))


@jax.jit
def subgraph(graph: Graph, nodes: jax.Array) -> Graph:
    """The sub-graph on ``nodes (m,)`` (distinct ids), re-normalised (SPEC §8.4). Jit-able.

    The unnormalised affinity is sliced to the rows and columns of ``nodes`` and normalised
    again with the degrees of the sub-block (Iscen et al., CVPR 2017, §4.4, truncation); node
    ``nodes[i]`` becomes node ``i``.
    """
    check_ndim(nodes, "nodes", (1,), "node ids (m,)")
    check_integer(nodes, "nodes")
    m = nodes.shape[0]
    pos = jnp.full(graph.n, -1, jnp.int32).at[nodes].set(jnp.arange(m, dtype=jnp.int32))
    ids = pos[graph.ids[nodes]]
    mask = graph.mask[nodes] & (ids >= 0)
    return from_affinity(ids, graph.affinity[nodes], mask, graph.mutual)


def _coo(graph: Graph, normalized: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row ids, column ids and values of all slots (transposed slots added for union lists)."""
    values = (graph.weights if normalized else graph.affinity).ravel()
    rows, cols = _row_index(graph.ids).ravel(), graph.ids.ravel()
    if graph.mutual:
        return rows, cols, values
    return (
        jnp.concatenate([rows, cols]),
        jnp.concatenate([cols, rows]),
        jnp.concatenate([values, values]),
    )


@partial(jax.jit, static_argnames=("normalized",))
def to_bcoo(graph: Graph, normalized: bool = True) -> jsparse.BCOO:
    """``S`` (or ``W`` with ``normalized=False``) as a ``jax.experimental.sparse.BCOO`` ``(n, n)``.

    All ``n·k`` slots are stored (``2·n·k`` for union lists), so the number of stored entries is
    static and the conversion is jit-able; padded slots are explicit zeros on the diagonal.
    """
    rows, cols, values = _coo(graph, normalized)
    return jsparse.BCOO((values, jnp.stack([rows, cols], axis=1)), shape=(graph.n, graph.n))


def to_scipy(graph: Graph, normalized: bool = True) -> scipy.sparse.csr_matrix:
    """``S`` (or ``W`` with ``normalized=False``) as a ``scipy.sparse.csr_matrix`` (edges only)."""
    keep = np.asarray(graph.mask).ravel()
    if not graph.mutual:
        keep = np.concatenate([keep, keep])
    rows, cols, values = (np.asarray(a)[keep] for a in _coo(graph, normalized))
    return scipy.sparse.csr_matrix((values, (rows, cols)), shape=(graph.n, graph.n))


@partial(jax.jit, static_argnames=("normalized",))
def to_dense(graph: Graph, normalized: bool = True) -> jax.Array:
    """``S`` (or ``W``) as a dense ``(n, n)`` array; for small graphs. Jit-able."""
    rows, cols, values = _coo(graph, normalized)
    return jnp.zeros((graph.n, graph.n), values.dtype).at[rows, cols].add(values)


@jax.jit
def _components(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = ids.shape[0]
    src, dst = _row_index(ids).ravel(), ids.ravel()
    valid = mask.ravel()

    def jump(labels):
        return lax.while_loop(lambda lab: jnp.any(lab[lab] != lab), lambda lab: lab[lab], labels)

    def hook(state):
        labels, _ = state
        a, b = labels[src], labels[dst]
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        new = jump(labels.at[hi].min(jnp.where(valid, lo, hi)))
        new = jump(new[new])
        return new, jnp.any(new != labels)

    labels, _ = lax.while_loop(lambda s: s[1], hook, (jnp.arange(n, dtype=jnp.int32), True))
    roots = labels == jnp.arange(n)
    compact = jnp.cumsum(roots, dtype=jnp.int32) - 1
    return roots.sum(dtype=jnp.int32), compact[labels]


def connected_components(graph: Graph) -> tuple[jax.Array, jax.Array]:
    """Connected components of the graph (edges = unmasked slots, either direction). Jit-able.

    Min-label hooking with pointer jumping (a parallel union-find, as FSR's block-diagonal
    reordering needs, Iscen et al., CVPR 2018, §7).

    Returns:
      ``n_components`` (int32 scalar) and ``labels (n,)`` int32 in ``[0, n_components)``,
      components numbered in the order of their smallest node.
    """
    return _components(graph.ids, graph.mask)


def write_npz(path: str | os.PathLike, kind: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` (npz) atomically, stamped with ``kind`` and the format version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, jret_kind=kind, jret_version=FORMAT_VERSION, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_npz(path: str | os.PathLike, kinds: tuple[str, ...]) -> tuple[str, dict]:
    """Read a file written by :func:`write_npz`; returns its kind and arrays.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a
    readable jret file of one of ``kinds`` or of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable jret file ({err})") from err
    kind = str(arrays.pop("jret_kind", ""))
    version = arrays.pop("jret_version", None)
    if kind not in kinds:
        raise ValueError(f"{path}: expected a jret file of kind {' or '.join(kinds)}, got {kind!r}")
    if version is None or int(version) != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}, this jret reads {FORMAT_VERSION}")
    return kind, arrays


def npz_field(arrays: dict, key: str, path) -> np.ndarray:
    """``arrays[key]``, or a ``ValueError`` naming the corrupt file when it is missing."""
    if key not in arrays:
        raise ValueError(f"{path}: corrupt file, missing {key!r}")
    return arrays[key]


_GRAPH_FIELDS = ("ids", "affinity", "weights", "mask", "mutual")


def graph_arrays(graph: Graph, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays that store a :class:`Graph`, under keys ``prefix + field``."""
    return {prefix + key: np.asarray(getattr(graph, key)) for key in _GRAPH_FIELDS}


def save(graph: Graph, path: str | os.PathLike) -> None:
    """Save a :class:`Graph` to ``path`` (npz; atomic: temp file + ``os.replace``)."""
    write_npz(path, "graph", graph_arrays(graph))


def graph_from_arrays(arrays: dict, path, prefix: str = "") -> Graph:
    """Rebuild a :class:`Graph` from the arrays of :func:`graph_arrays` (keys under ``prefix``)."""
    fields = {key: npz_field(arrays, prefix + key, path) for key in _GRAPH_FIELDS}
    shape = fields["ids"].shape
    if len(shape) != 2 or any(
        fields[key].shape != shape for key in ("affinity", "weights", "mask")
    ):
        raise ValueError(f"{path}: corrupt graph, inconsistent list shapes")
    return Graph(
        ids=jnp.asarray(fields["ids"], jnp.int32),
        affinity=jnp.asarray(fields["affinity"], jnp.float32),
        weights=jnp.asarray(fields["weights"], jnp.float32),
        mask=jnp.asarray(fields["mask"], bool),
        mutual=bool(fields["mutual"]),
    )


def load(path: str | os.PathLike) -> Graph:
    """Load a :class:`Graph` written by :func:`save` (clear errors on a missing/corrupt file)."""
    _, arrays = read_npz(path, ("graph",))
    return graph_from_arrays(arrays, path)
