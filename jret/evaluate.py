"""Retrieval evaluation: the revisited Oxford/Paris protocol and the old Oxford5k/Paris6k one.

Exact semantics of the revisitop evaluator (Radenović et al., "Revisiting Oxford and Paris",
CVPR 2018; SPEC §1.4): average precision is the trapezoidal area under the precision-recall
curve, computed on positions from which the junk ("unclear") images have been removed; mP@k
keeps the reference code's denominator ``min(rank of the last positive, k)``; queries without a
positive are left out of the means.

This is host-side numpy code (evaluation, not a jitted kernel). Ranks use the revisitop layout
``(n_ranked, n_queries)``: column ``q`` holds database indices by decreasing score. jret's search
returns ids as rows ``(n_queries, k)``; convert them with :func:`ranks_from_ids`. A ranking may be
truncated (fewer rows than the database): positives missing from it count as misses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jret._checks import check_integer, check_ndim, check_positive_int

SETUPS = ("easy", "medium", "hard")

# Setup -> (gnd keys whose union is "ok", gnd keys whose union is "junk"), SPEC §1.4.1.
_SETUP_KEYS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
_REVISITED_KEYS = ("easy", "hard", "junk")


def ranks_from_ids(ids) -> np.ndarray:
    """Convert jret ids ``(n_queries, k)`` to revisitop ranks ``(k, n_queries)``.

    Args:
      ids: integer array ``(n_queries, k)``, row ``q`` = database ids by decreasing score (the
        layout of ``jret.search.knn``).

    Returns:
      ``(k, n_queries)`` integer numpy array, column ``q`` = the same ids.
    """
    ids = np.asarray(ids)
    check_ndim(ids, "ids", (2,), "a 2-D array (n_queries, k)")
    check_integer(ids, "ids")
    return np.ascontiguousarray(ids.T)


def compute_ap(ranks, nres: int, validate: bool = True) -> float:
    """Trapezoidal average precision of one query (revisitop ``compute_ap``, SPEC §1.4.2).

    For the ``j``-th positive (0-based) at junk-compacted position ``r`` (0-based):
    ``prec0 = 1 if r == 0 else j / r``, ``prec1 = (j + 1) / (r + 1)`` and
    ``AP = Σ_j (prec0 + prec1) / 2 / nres``. Positives that were not retrieved are simply absent
    from ``ranks`` and contribute 0.

    Args:
      ranks: ``(P,)`` sorted 0-based positions of the retrieved positives, junk already removed.
      nres: number of positives of the query (``nres >= P``, ``nres >= 1``).
      validate: check that ``ranks`` is strictly increasing, non-negative and ``nres >= P``.

    Returns:
      AP as a float in [0, 1].
    """
    ranks = np.asarray(ranks)
    check_ndim(ranks, "ranks", (1,), "a 1-D array of positions (P,)")
    if ranks.size == 0:
        ranks = ranks.astype(np.int64)
    check_integer(ranks, "ranks")
    nres = check_positive_int(nres, "nres")
    if validate:
        if ranks.size and (ranks[0] < 0 or np.any(np.diff(ranks) <= 0)):
            raise ValueError("ranks: expected strictly increasing non-negative positions")
        if ranks.size > nres:
            raise ValueError(f"nres: expected at least len(ranks) = {ranks.size}, got {nres}")
    r = ranks.astype(np.float64)
    j = np.arange(r.size, dtype=np.float64)
    prec0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    prec1 = (j + 1.0) / (r + 1.0)
    return float(np.sum(prec0 + prec1) / 2.0 / nres)


def compute_map(
    ranks,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = (1, 5, 10),
    db_size: int | None = None,
    validate: bool = True,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mP@k with exact revisitop semantics (SPEC §1.4.2, §1.4.3).

    Per query: ``pos`` = sorted positions of its ``ok`` images in column ``q`` of ``ranks``,
    each decreased by the number of its ``junk`` images ranked before it; AP by
    :func:`compute_ap` with ``nres = |ok|``. With 1-based ``pos``, ``k_q = min(max(pos), k)`` and
    ``P@k = |{p in pos : p <= k_q}| / k_q`` (reference quirk, kept on purpose); a query with
    positives of which none was retrieved has AP = P@k = 0. Queries with an empty ``ok`` get NaN
    and are excluded from the means; when every query is empty the means are NaN.

    Args:
      ranks: integer ``(n_ranked, n_queries)``, column ``q`` = database ids by decreasing score
        (may be truncated: ``n_ranked <= db_size``).
      gnd: ``n_queries`` mappings with ``'ok'`` and optionally ``'junk'`` index lists
        (disjoint; ``ok`` without repeats).
      kappas: the ``k`` of mP@k (default ``(1, 5, 10)``).
      db_size: database size; when given, ids in ``ranks`` and ``gnd`` must lie in
        ``[0, db_size)``.
      validate: value checks (id range, repeated ids within a column, repeated positives,
        positives that are also junk).

    Returns:
      ``(map, aps, mpr, prs)``: mAP (float, a fraction in [0, 1]), per-query AP
      ``(n_queries,)``, mP@k ``(len(kappas),)`` and per-query P@k ``(n_queries, len(kappas))``.
    """
    ranks = _as_ranks(ranks)
    kappas = _as_kappas(kappas)
    _check_gnd_structure(gnd, ranks.shape[1], ("ok",))
    oks = [_as_ids(g["ok"], f"gnd[{q}]['ok']") for q, g in enumerate(gnd)]
    junks = [_as_ids(g.get("junk", ()), f"gnd[{q}]['junk']") for q, g in enumerate(gnd)]
    if validate:
        db_size = _check_ranks_values(ranks, db_size)
        _check_gnd_values({"ok": oks, "junk": junks}, db_size)
        _check_disjoint({"ok": oks, "junk": junks}, "ok", "junk")
    return _evaluate_groups(ranks, {"ok": oks, "junk": junks}, [(("ok",), ("junk",))], kappas)[0]


def setup_gnd(gnd: Sequence[Mapping], setup: str) -> list[dict]:
    """Revisited ground truth (``easy``/``hard``/``junk``) -> ``ok``/``junk`` of one setup.

    SPEC §1.4.1: Easy: ok = easy, junk = junk ∪ hard; Medium: ok = easy ∪ hard, junk = junk;
    Hard: ok = hard, junk = junk ∪ easy.

    Args:
      gnd: mappings with ``'easy'``, ``'hard'`` and ``'junk'`` index lists.
      setup: ``'easy'``, ``'medium'`` or ``'hard'``.

    Returns:
      a list of ``{'ok': int64 array, 'junk': int64 array}``, one per query.
    """
    if setup not in _SETUP_KEYS:
        raise ValueError(f"setup: expected one of {SETUPS}, got {setup!r}")
    _check_gnd_structure(gnd, len(gnd), _REVISITED_KEYS)
    ok_keys, junk_keys = _SETUP_KEYS[setup]
    out = []
    for q, g in enumerate(gnd):
        ok = [_as_ids(g[key], f"gnd[{q}][{key!r}]") for key in ok_keys]
        junk = [_as_ids(g[key], f"gnd[{q}][{key!r}]") for key in junk_keys]
        out.append({"ok": np.concatenate(ok), "junk": np.concatenate(junk)})
    return out


def evaluate_revisited(
    ranks,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = (1, 5, 10),
    db_size: int | None = None,
    validate: bool = True,
) -> dict[str, dict]:
    """Revisited Oxford/Paris evaluation in the Easy, Medium and Hard setups (SPEC §1.4).

    Args:
      ranks: integer ``(n_ranked, n_queries)``, revisitop layout (see :func:`ranks_from_ids`).
      gnd: revisitop ground truth, one mapping per query with ``'easy'``, ``'hard'``, ``'junk'``
        (and ``'bbx'``, unused here).
      kappas: the ``k`` of mP@k (default ``(1, 5, 10)``).
      db_size: database size (database + distractors for +R1M) for the id range checks.
      validate: value checks as in :func:`compute_map`, plus easy/hard/junk pairwise disjoint.

    Returns:
      ``{setup: {'map': float, 'mp@k': {k: float}, 'aps': (n_queries,) array}}`` for
      ``setup`` in ``('easy', 'medium', 'hard')``; values are fractions in [0, 1], NaN for a query
      (or a whole setup) without positives.
    """
    ranks = _as_ranks(ranks)
    kappas = _as_kappas(kappas)
    _check_gnd_structure(gnd, ranks.shape[1], _REVISITED_KEYS)
    sets = {
        key: [_as_ids(g[key], f"gnd[{q}][{key!r}]") for q, g in enumerate(gnd)]
        for key in _REVISITED_KEYS
    }
    if validate:
        db_size = _check_ranks_values(ranks, db_size)
        _check_gnd_values(sets, db_size)
        for a, b in (("easy", "hard"), ("easy", "junk"), ("hard", "junk")):
            _check_disjoint(sets, a, b)
    per_setup = _evaluate_groups(ranks, sets, [_SETUP_KEYS[s] for s in SETUPS], kappas)
    return {
        setup: _result_dict(map_, aps, mpr, kappas)
        for setup, (map_, aps, mpr, _) in zip(SETUPS, per_setup, strict=True)
    }


def evaluate_old(
    ranks,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = (1, 5, 10),
    db_size: int | None = None,
    validate: bool = True,
) -> dict:
    """Old Oxford5k/Paris6k protocol: positives ``ok`` (good ∪ ok), ``junk`` ignored (SPEC §1.5).

    Same trapezoidal AP and mP@k as :func:`compute_map`; the query images stay in the database.

    Args:
      ranks: integer ``(n_ranked, n_queries)``, revisitop layout (see :func:`ranks_from_ids`).
      gnd: one mapping per query with ``'ok'`` and ``'junk'`` index lists.
      kappas: the ``k`` of mP@k (default ``(1, 5, 10)``).
      db_size: database size for the id range checks.
      validate: value checks as in :func:`compute_map`.

    Returns:
      ``{'map': float, 'mp@k': {k: float}, 'aps': (n_queries,) array}``.
    """
    ranks = _as_ranks(ranks)
    kappas = _as_kappas(kappas)
    _check_gnd_structure(gnd, ranks.shape[1], ("ok", "junk"))
    map_, aps, mpr, _ = compute_map(ranks, gnd, kappas, db_size, validate)
    return _result_dict(map_, aps, mpr, kappas)


def _result_dict(map_: float, aps: np.ndarray, mpr: np.ndarray, kappas: tuple[int, ...]) -> dict:
    mpk = {k: float(p) for k, p in zip(kappas, mpr, strict=True)}
    return {"map": map_, "mp@k": mpk, "aps": aps}


def _evaluate_groups(
    ranks: np.ndarray,
    groups: dict[str, list[np.ndarray]],
    setups: Sequence[tuple[tuple[str, ...], tuple[str, ...]]],
    kappas: tuple[int, ...],
) -> list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]:
    """``(map, aps, mpr, prs)`` for each ``(ok keys, junk keys)`` setup over labelled id groups."""
    keys = list(groups)
    nq = ranks.shape[1]
    aps = np.full((len(setups), nq), np.nan)
    prs = np.full((len(setups), nq, len(kappas)), np.nan)
    for q, (pos, labels) in enumerate(_labelled_hits(ranks, groups)):
        for s, (ok_keys, junk_keys) in enumerate(setups):
            n_ok = sum(groups[key][q].size for key in ok_keys)
            if n_ok == 0:
                continue
            is_ok = np.isin(labels, [keys.index(key) + 1 for key in ok_keys])
            is_junk = np.isin(labels, [keys.index(key) + 1 for key in junk_keys])
            # junk compaction: a positive moves up by the number of junk hits ranked before it
            compacted = pos[is_ok] - np.cumsum(is_junk)[is_ok]
            aps[s, q] = compute_ap(compacted, n_ok, validate=False)
            prs[s, q] = _precision_at(compacted, kappas)
    return [_means(aps[s], prs[s]) for s in range(len(setups))]


def _labelled_hits(
    ranks: np.ndarray, groups: dict[str, list[np.ndarray]], block: int = 1 << 16
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query: sorted positions in its column of the ids of any group, and their group codes.

    Group ``i`` of ``groups`` (in key order) gets code ``i + 1``. The ranking is read once, in
    contiguous row blocks (a column of a ``(n_ranked, n_queries)`` array is strided): ids of any
    query's groups are flagged through a dense table, and only the flagged entries are matched
    against the sorted ``(id, query)`` keys of each group.
    """
    nq = ranks.shape[1]
    ids, qs, codes = [], [], []
    for code, per_query in enumerate(groups.values(), start=1):
        for q, g in enumerate(per_query):
            ids.append(g)
            qs.append(np.full(g.size, q, dtype=np.int64))
            codes.append(np.full(g.size, code, dtype=np.int8))
    ids, qs, codes = np.concatenate(ids), np.concatenate(qs), np.concatenate(codes)
    if ids.size == 0 or ranks.size == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.int8)) for _ in range(nq)]
    member = np.zeros(max(int(ids.max()), int(ranks.max())) + 1, dtype=bool)
    member[ids] = True
    found = [np.nonzero(member[ranks[i : i + block]]) for i in range(0, ranks.shape[0], block)]
    rows = np.concatenate([r + i * block for i, (r, _) in enumerate(found)])
    cols = np.concatenate([c for _, c in found])
    table_keys = ids * nq + qs
    order = np.argsort(table_keys, kind="stable")
    table_keys, codes = table_keys[order], codes[order]
    hit_keys = ranks[rows, cols].astype(np.int64) * nq + cols
    at = np.minimum(np.searchsorted(table_keys, hit_keys), table_keys.size - 1)
    keep = table_keys[at] == hit_keys
    rows, cols, labels = rows[keep], cols[keep], codes[at[keep]]
    order = np.argsort(cols, kind="stable")  # rows stay sorted within each column
    rows, cols, labels = rows[order], cols[order], labels[order]
    bounds = np.searchsorted(cols, np.arange(nq + 1))
    return [(rows[b0:b1], labels[b0:b1]) for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True)]


def _means(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Means over the queries with positives (NaN when there is none)."""
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(prs.shape[1], np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def _precision_at(pos: np.ndarray, kappas: tuple[int, ...]) -> np.ndarray:
    """P@k with the revisitop denominator ``k_q = min(max(pos), k)`` (1-based ``pos``)."""
    if pos.size == 0:
        return np.zeros(len(kappas))
    pos1 = pos + 1
    kq = np.minimum(pos1[-1], np.asarray(kappas, dtype=np.int64))
    return (pos1[None, :] <= kq[:, None]).sum(axis=1) / kq


def _as_ranks(ranks) -> np.ndarray:
    ranks = np.asarray(ranks)
    check_ndim(ranks, "ranks", (2,), "a 2-D array (n_ranked, n_queries)")
    check_integer(ranks, "ranks")
    return ranks


def _as_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    return tuple(check_positive_int(k, f"kappas[{i}]") for i, k in enumerate(kappas))


def _as_ids(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    check_ndim(arr, name, (1,), "a 1-D list of database indices")
    check_integer(arr, name)
    return arr.astype(np.int64)


def _check_gnd_structure(
    gnd: Sequence[Mapping], n_queries: int | None, keys: Sequence[str]
) -> None:
    if n_queries is not None and len(gnd) != n_queries:
        raise ValueError(f"gnd: expected {n_queries} entries (one per query), got {len(gnd)}")
    for q, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise ValueError(f"gnd[{q}]: expected a dict, got {type(g).__name__}")
        for key in keys:
            if key not in g:
                raise ValueError(f"gnd[{q}]: missing key {key!r} (expected keys {tuple(keys)})")


def _check_ranks_values(ranks: np.ndarray, db_size: int | None) -> int | None:
    """Ids in ``[0, db_size)`` and no repeated id in a column; returns ``db_size`` as an int."""
    if db_size is not None:
        db_size = check_positive_int(db_size, "db_size")
    if ranks.size == 0:
        return db_size
    lo, hi = int(ranks.min()), int(ranks.max())
    if lo < 0 or (db_size is not None and hi >= db_size):
        want = f"[0, {db_size})" if db_size is not None else "non-negative values"
        raise ValueError(f"ranks: expected ids in {want}, got values in [{lo}, {hi}]")
    if _has_repeats(ranks, hi):
        for q in range(ranks.shape[1]):
            if _has_repeats(ranks[:, q : q + 1], hi):
                raise ValueError(f"ranks: column {q} (query {q}) repeats a database id")
    return db_size


def _has_repeats(ids: np.ndarray, hi: int, block: int = 1 << 16) -> bool:
    """Whether a column of non-negative ``ids`` ``(n, m)`` (max ``hi``) repeats a value.

    Marks ``(id, column)`` pairs in a dense table, reading ``ids`` in contiguous row blocks:
    O(n·m) when the ids are dense, a sort per column otherwise.
    """
    n, m = ids.shape
    if hi + 1 > 8 * n + 1024:
        return any(np.unique(ids[:, j]).size != n for j in range(m))
    seen = np.zeros((hi + 1) * m, dtype=bool)
    cols = np.arange(m, dtype=np.int64)
    for i in range(0, n, block):
        seen[ids[i : i + block].astype(np.int64) * m + cols] = True
    return np.count_nonzero(seen) != ids.size


def _check_gnd_values(sets: dict[str, list[np.ndarray]], db_size: int | None) -> None:
    for key, per_query in sets.items():
        for q, ids in enumerate(per_query):
            if ids.size == 0:
                continue
            if ids.min() < 0 or (db_size is not None and ids.max() >= db_size):
                want = f"[0, {db_size})" if db_size is not None else "non-negative values"
                raise ValueError(
                    f"gnd[{q}][{key!r}]: expected indices in {want}, got values in "
                    f"[{ids.min()}, {ids.max()}]"
                )
            if key != "junk" and _has_repeats(ids[:, None], int(ids.max())):
                raise ValueError(f"gnd[{q}][{key!r}]: repeated index (positives must be unique)")


def _check_disjoint(sets: dict[str, list[np.ndarray]], a: str, b: str) -> None:
    for q, (ids_a, ids_b) in enumerate(zip(sets[a], sets[b], strict=True)):
        common = np.intersect1d(ids_a, ids_b)
        if common.size:
            raise ValueError(
                f"gnd[{q}]: {a!r} and {b!r} share {common.size} index(es), e.g. {common[0]}"
            )
