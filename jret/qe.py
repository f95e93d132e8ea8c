"""Query expansion and database-side augmentation of global descriptors.

All functions take ℓ2-normalised rows and return ℓ2-normalised rows of the same shape, to be
searched again with :func:`jret.search.knn`.

References: AQE, Chum et al., "Total recall", ICCV 2007; αQE, Radenović, Tolias & Chum, TPAMI 2018,
Sec. 4 ([000] L2930–2945, defaults α = 3, n_QE = 50 at [000] L3515); DBA/αDBA as in the public
deep-image-retrieval code (SPEC §7.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jret._checks import check_ndim, check_positive_int, check_same_dim
from jret.hqe import hqe as hqe  # Hamming query expansion on local features (SPEC §7.4)
from jret.normalize import l2n
from jret.search import knn


def expand(
    vectors: jax.Array,
    database: jax.Array,
    scores: jax.Array,
    ids: jax.Array,
    alpha: float = 3.0,
    self_weight: float = 1.0,
    batch_size: int = 256,
) -> jax.Array:
    """αQE update from given neighbours: ``l2n(w₀·v + Σ_i max(s_i, 0)^α · x_{id_i})``.

    The jit-able core of :func:`alpha_qe`, :func:`aqe` and :func:`dba`; ``alpha = 0`` gives the
    plain average of AQE (every neighbour weighs 1).

    Args:
      vectors: ``(m, D)`` rows to expand (queries, or the database itself for DBA).
      database: ``(n, D)`` database rows.
      scores: ``(m, k)`` similarities of the neighbours.
      ids: ``(m, k)`` database ids of the neighbours.
      alpha: the αQE exponent (default 3.0); negative similarities are clamped to 0 first.
      self_weight: weight of the row itself (1 = its self-similarity^α for a unit vector; 0 drops it).
      batch_size: rows gathered at a time, bounding memory to ``batch_size·k·D``.
    """
    check_ndim(vectors, "vectors", (2,), "rows (m, D)")
    check_ndim(database, "database", (2,), "rows (n, D)")
    check_same_dim(vectors, database, "vectors", "database")
    if scores.shape != ids.shape or scores.shape[0] != vectors.shape[0]:
        raise ValueError(
            f"scores and ids: expected equal shapes (m, k) with m = {vectors.shape[0]}, "
            f"got {scores.shape} and {ids.shape}"
        )
    vectors, database = jnp.asarray(vectors), jnp.asarray(database)
    scores, ids = jnp.asarray(scores), jnp.asarray(ids)
    weights = jnp.ones_like(scores) if alpha == 0 else jnp.maximum(scores, 0.0) ** alpha

    def neighbour_sum(row):
        row_ids, row_w = row
        return row_w.astype(database.dtype) @ database[row_ids]

    summed = jax.lax.map(neighbour_sum, (ids, weights), batch_size=batch_size)
    return l2n(self_weight * vectors + summed)


def alpha_qe(
    q: jax.Array,
    db: jax.Array,
    k: int = 50,
    alpha: float = 3.0,
    include_query: bool = True,
    validate: bool = True,
) -> jax.Array:
    """α-weighted query expansion (αQE), TPAMI 2018:
    ``q' = l2n(q + Σ_{i=1..k} (qᵀx_{r_i})^α x_{r_i})`` over the top-k database results.

    Defaults of the paper: ``k = n_QE = 50``, ``α = 3``. The query itself is included with weight 1
    (its self-similarity^α), as in the reference code; ``include_query=False`` drops it.

    Args:
      q: queries ``(nq, D)``, ℓ2-normalised.
      db: database ``(n, D)``, ℓ2-normalised.
      k: number of top results averaged (default 50), ``1 <= k <= n``.
      alpha: the exponent (default 3.0); ``0`` gives AQE.
      include_query: keep the query in the sum (default True).
      validate: run the value checks of :func:`jret.search.knn`.

    Returns the expanded queries ``(nq, D)``, ℓ2-normalised.
    """
    check_positive_int(k, "k")
    scores, ids = knn(q, db, k, validate=validate)
    return expand(q, db, scores, ids, alpha=alpha, self_weight=1.0 if include_query else 0.0)


def aqe(q: jax.Array, db: jax.Array, k: int = 5, validate: bool = True) -> jax.Array:
    """Average query expansion (Chum et al., ICCV 2007): ``q' = l2n(q + Σ_{i=1..k} x_{r_i})``.

    Args:
      q: queries ``(nq, D)``; db: database ``(n, D)``; both ℓ2-normalised.
      k: number of top results averaged with the query (default 5).
    """
    return alpha_qe(q, db, k=k, alpha=0.0, validate=validate)


def dba(db: jax.Array, k: int = 10, alpha: float = 3.0, validate: bool = True) -> jax.Array:
    """Database-side augmentation (αDBA): every database vector is replaced by
    ``l2n(x + Σ_{j ∈ NN_k(x), j ≠ x} max(xᵀx_j, 0)^α x_j)`` (SPEC §7.3), itself excluded.

    ``alpha = 0`` gives plain DBA (uniform weights). Defaults ``k = 10``, ``α = 3`` (jret's choice;
    the seeds do not use DBA).

    Args:
      db: database ``(n, D)``, ℓ2-normalised.
      k: neighbours per item, ``1 <= k < n``.
      alpha: the exponent (default 3.0).

    Returns the augmented database ``(n, D)``; search it with queries expanded or not.
    """
    check_ndim(db, "db", (2,), "rows (n, D)")
    k = check_positive_int(k, "k")
    if k >= db.shape[0]:
        raise ValueError(
            f"k: expected fewer neighbours than database items ({db.shape[0]}), got {k}"
        )
    scores, ids = knn(db, db, k + 1, validate=validate)
    not_self = ids != jnp.arange(db.shape[0])[:, None]
    order = jnp.argsort(~not_self, axis=1, stable=True)[:, :k]
    scores = jnp.take_along_axis(scores, order, axis=1)
    ids = jnp.take_along_axis(ids, order, axis=1)
    return expand(db, db, scores, ids, alpha=alpha, self_weight=1.0)
