"""Per-epoch training tuples of the reference method (SPEC §4.4; [REF cirtorch], [003] L159).

Every epoch draws ``query_size`` random (query, positive) pairs out of the fixed training pairs
and a pool of ``pool_size`` random training images (:func:`sample_epoch`). The hard negatives of
each query are then mined in the pool with the current network
(:func:`jret.train.mining.mine_hard_negatives`), and :func:`make_tuples` lays out one tuple per
query: ``(query, positive, n_1, ..., n_k)``. In the reference loss a tuple's labels are
``(-1, 1, 0, ..., 0)`` (:func:`tuple_labels`): -1 the query, 1 the positive, 0 a negative; jret's
losses take the labels of the pairs ``(query, other)``, ``tuple_labels(k)[1:]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jret._checks import check_integer, check_ndim, check_nonempty, check_positive_int

QUERY_SIZE = 2000
POOL_SIZE = 20000
NUM_NEGATIVES = 5


def sample_epoch(
    seed: int | Sequence[int],
    qidxs: np.ndarray,
    pidxs: np.ndarray,
    num_images: int,
    query_size: int = QUERY_SIZE,
    pool_size: int = POOL_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The queries, positives and negative pool of one epoch (``create_epoch_tuples``).

    Draws a random permutation of the ``P`` pairs and keeps the first ``min(query_size, P)``,
    then a random permutation of the ``num_images`` images and keeps the first
    ``min(pool_size, num_images)``, both from ``np.random.default_rng(seed)``. The pool may hold
    the queries and positives; mining skips them (same cluster as the query).

    Args:
      seed: int or sequence of non-negative ints, e.g. ``(seed, epoch)``.
      qidxs: ``(P,)`` query image of each training pair.
      pidxs: ``(P,)`` its positive.
      num_images: number of training images ``N``; indices are in ``[0, N)``.
      query_size: queries per epoch (default 2000).
      pool_size: negative pool size (default 20000; 22000 in the ResNet-101 GeM recipe).

    Returns:
      ``(queries (Q,), positives (Q,), pool (M,))`` int64 with ``Q = min(query_size, P)`` and
      ``M = min(pool_size, N)``; pool ids are distinct.

    Raises:
      ValueError: non-integer, mismatched or empty pair lists, indices outside ``[0, N)``, or a
        non-positive size.
    """
    num_images = check_positive_int(num_images, "num_images")
    query_size = check_positive_int(query_size, "query_size")
    pool_size = check_positive_int(pool_size, "pool_size")
    qidxs, pidxs = np.asarray(qidxs), np.asarray(pidxs)
    for arr, name in ((qidxs, "qidxs"), (pidxs, "pidxs")):
        check_ndim(arr, name, (1,), "a 1-D list of image indices (P,)")
        check_integer(arr, name)
        check_nonempty(arr, name)
        _check_range(arr, name, num_images)
    if qidxs.shape != pidxs.shape:
        raise ValueError(
            f"qidxs and pidxs: expected equal lengths, got {qidxs.shape} vs {pidxs.shape}"
        )
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(qidxs.shape[0])[:query_size]
    pool = rng.permutation(num_images)[:pool_size]
    return qidxs[pairs].astype(np.int64), pidxs[pairs].astype(np.int64), pool.astype(np.int64)


def make_tuples(
    qidx: np.ndarray,
    pidx: np.ndarray,
    negatives: np.ndarray,
    clusters: np.ndarray | None = None,
    validate: bool = True,
) -> np.ndarray:
    """Training tuples ``(query, positive, n_1, ..., n_k)``, one row per query.

    Args:
      qidx: ``(T,)`` query image ids.
      pidx: ``(T,)`` positive image ids.
      negatives: ``(T, k)`` negative image ids (``k >= 1``, e.g. 5).
      clusters: optional ``(N,)`` cluster id per image; with ``validate``, each positive must
        share its query's cluster and no negative may.
      validate: run the value checks (negative ids, the cluster rule).

    Returns:
      ``(T, 2 + k)`` int64 image ids; the labels of a row are :func:`tuple_labels` ``(k)``.

    Raises:
      ValueError: bad shapes or dtypes, negative ids, or (with ``clusters``) a tuple breaking
        the cluster rule, naming its row.
    """
    qidx, pidx, negatives = np.asarray(qidx), np.asarray(pidx), np.asarray(negatives)
    check_ndim(qidx, "qidx", (1,), "query ids (T,)")
    check_ndim(pidx, "pidx", (1,), "positive ids (T,)")
    check_ndim(negatives, "negatives", (2,), "negative ids (T, k)")
    for arr, name in ((qidx, "qidx"), (pidx, "pidx"), (negatives, "negatives")):
        check_integer(arr, name)
    if not qidx.shape[0] == pidx.shape[0] == negatives.shape[0]:
        raise ValueError(
            f"qidx, pidx and negatives: expected the same number of tuples, got "
            f"{qidx.shape}, {pidx.shape}, {negatives.shape}"
        )
    if negatives.shape[1] == 0:
        raise ValueError(
            f"negatives: expected at least one negative per tuple, got {negatives.shape}"
        )
    tuples = np.concatenate([qidx[:, None], pidx[:, None], negatives], axis=1).astype(np.int64)
    if validate:
        if tuples.size and tuples.min() < 0:
            row = int(np.argwhere(tuples < 0)[0, 0])
            raise ValueError(f"tuple {row}: negative image id in {tuples[row].tolist()}")
        if clusters is not None:
            _check_clusters(tuples, np.asarray(clusters))
    return tuples


def tuple_labels(num_negatives: int = NUM_NEGATIVES) -> np.ndarray:
    """The reference labels of a tuple, ``(2 + k,)`` int32: ``[-1, 1, 0, ..., 0]``."""
    num_negatives = check_positive_int(num_negatives, "num_negatives")
    return np.array([-1, 1] + [0] * num_negatives, np.int32)


def _check_range(arr: np.ndarray, name: str, n: int) -> None:
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(
            f"{name}: expected image indices in [0, {n}), got values in [{arr.min()}, {arr.max()}]"
        )


def _check_clusters(tuples: np.ndarray, clusters: np.ndarray) -> None:
    check_ndim(clusters, "clusters", (1,), "one cluster id per image (N,)")
    _check_range(tuples, "tuples", clusters.shape[0])
    c = clusters[tuples]
    bad = np.flatnonzero(c[:, 1] != c[:, 0])
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"tuple {row}: positive {tuples[row, 1]} is in cluster {c[row, 1]}, "
            f"its query {tuples[row, 0]} in cluster {c[row, 0]}"
        )
    bad = np.flatnonzero((c[:, 2:] == c[:, :1]).any(axis=1))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"tuple {row}: a negative of {tuples[row, 2:].tolist()} shares the query's "
            f"cluster {c[row, 0]}"
        )
