"""Tests for jret.evaluate: hand-computed APs, the revisited setups, and a brute-force reference."""

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from jret.evaluate import (
    compute_ap,
    compute_map,
    evaluate_old,
    evaluate_revisited,
    ranks_from_ids,
    setup_gnd,
)

# ---------------------------------------------------------------------------------------------
# Independent reference: walk the ranked list, drop junk items, accumulate exact trapezoids.


def brute_force(column, ok, junk, kappas):
    """AP and P@k of one query, with exact fractions; (None, None) for a query without positives."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk)
    if not ok:
        return None, None
    kept = [int(i) for i in column if int(i) not in junk]  # the ranked list without junk
    hits_before, area, last_hit = 0, Fraction(0), 0
    for r, item in enumerate(kept):
        if item not in ok:
            continue
        # precision just before this hit (1 at the top of the list) and just after it
        p_before = Fraction(1) if r == 0 else Fraction(hits_before, r)
        p_after = Fraction(hits_before + 1, r + 1)
        area += (p_before + p_after) / 2 * Fraction(1, len(ok))  # recall step 1/|ok|
        hits_before += 1
        last_hit = r + 1
    prk = []
    for k in kappas:
        if hits_before == 0:
            prk.append(Fraction(0))
            continue
        kq = min(last_hit, k)
        prk.append(Fraction(sum(1 for item in kept[:kq] if item in ok), kq))
    return area, prk


def brute_force_map(ranks, oks, junks, kappas):
    aps, prs = [], []
    for q in range(ranks.shape[1]):
        ap, prk = brute_force(ranks[:, q], oks[q], junks[q], kappas)
        if ap is not None:
            aps.append(ap)
            prs.append(prk)
    mean_ap = sum(aps) / len(aps)
    mpr = [sum(p[i] for p in prs) / len(prs) for i in range(len(kappas))]
    return float(mean_ap), [float(v) for v in mpr]


# ---------------------------------------------------------------------------------------------
# compute_ap


def test_compute_ap_hand_computed():
    # positives at 0 and 2, nres = 2:
    #   j=0, r=0: prec0 = 1,   prec1 = 1/1 -> (1 + 1) / 2     = 1
    #   j=1, r=2: prec0 = 1/2, prec1 = 2/3 -> (1/2 + 2/3) / 2 = 7/12
    #   AP = (1 + 7/12) / 2 = 19/24
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx(19 / 24)
    # positives at 1 and 3, one positive never retrieved (nres = 3):
    #   j=0, r=1: prec0 = 0/1 = 0, prec1 = 1/2 -> mean 1/4
    #   j=1, r=3: prec0 = 1/3,     prec1 = 2/4 -> mean 5/12
    #   AP = (1/4 + 5/12) / 3 = (2/3) / 3 = 2/9
    assert compute_ap(np.array([1, 3]), 3) == pytest.approx(2 / 9)
    # perfect ranking -> 1; nothing retrieved -> 0
    assert compute_ap(np.arange(4), 4) == pytest.approx(1.0)
    assert compute_ap(np.array([], dtype=np.int32), 3) == 0.0


def test_compute_ap_bad_input():
    with pytest.raises(ValueError, match="nres"):
        compute_ap(np.array([0, 1]), 0)
    with pytest.raises(ValueError, match="nres"):
        compute_ap(np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        compute_ap(np.array([2, 1]), 2)
    with pytest.raises(ValueError, match="ranks"):
        compute_ap(np.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="ranks"):
        compute_ap(np.array([[0, 1]]), 2)


# ---------------------------------------------------------------------------------------------
# compute_map


def test_junk_before_positives_is_compacted():
    # column: [J, P, N, J, P] with P = {10, 11}, J = {20, 21}; raw positive positions 1, 4,
    # junk at 0, 3 -> compacted 0, 2 -> AP = 19/24 (as in test_compute_ap_hand_computed).
    column = np.array([20, 10, 30, 21, 11, 31])
    gnd = [{"ok": [10, 11], "junk": [20, 21]}]
    map_, aps, mpr, prs = compute_map(column[:, None], gnd)
    assert map_ == pytest.approx(19 / 24)
    assert aps == pytest.approx([19 / 24])
    # mP@k quirk on 1-based compacted positions {1, 3}: k_q = min(3, k)
    #   k=1: k_q = 1 -> 1/1; k=5: k_q = 3 -> 2/3 (not 2/5); k=10: k_q = 3 -> 2/3
    assert mpr == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert prs.shape == (1, 3)
    # without the junk declared, positives sit at 1 and 4:
    #   j=0, r=1: (0 + 1/2) / 2 = 1/4; j=1, r=4: (1/4 + 2/5) / 2 = 13/40
    #   AP = (1/4 + 13/40) / 2 = 23/80
    map_no_junk, *_ = compute_map(column[:, None], [{"ok": [10, 11]}])
    assert map_no_junk == pytest.approx(23 / 80)


def test_junk_after_last_positive_changes_nothing():
    column = np.array([10, 11, 20, 21])
    a, *_ = compute_map(column[:, None], [{"ok": [10, 11], "junk": [20, 21]}])
    assert a == pytest.approx(1.0)


def test_empty_queries_are_skipped():
    ranks = np.array([[0, 0, 2], [1, 1, 1], [2, 2, 0]])
    # query 0: ok = {1} at position 1 -> AP = (0 + 1/2)/2 = 1/4; query 1 empty; query 2: ok = {2}
    # at position 0 -> AP = 1.
    gnd = [{"ok": [1]}, {"ok": []}, {"ok": np.array([2])}]
    map_, aps, mpr, prs = compute_map(ranks, gnd, kappas=(1, 2))
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert aps[[0, 2]] == pytest.approx([1 / 4, 1.0])
    assert map_ == pytest.approx((1 / 4 + 1.0) / 2)
    # P@1: query 0 k_q = min(2, 1) = 1 -> 0; query 2 -> 1. P@2: query 0 k_q = 2 -> 1/2; query 2:
    # k_q = min(1, 2) = 1 -> 1.
    assert mpr == pytest.approx([0.5, 0.75])


def test_all_queries_empty_gives_nan():
    map_, aps, mpr, _ = compute_map(np.array([[0], [1]]), [{"ok": []}])
    assert np.isnan(map_) and np.isnan(aps).all() and np.isnan(mpr).all()


def test_truncated_rank_list():
    # database of 6, only the top 3 ranked. ok = {4, 1, 5}: 4 at 0, 1 at 2, 5 not retrieved.
    #   j=0, r=0: 1; j=1, r=2: (1/2 + 2/3)/2 = 7/12 -> AP = (1 + 7/12) / 3 = 19/36
    ranks = np.array([[4], [0], [1]])
    map_, aps, mpr, _ = compute_map(ranks, [{"ok": [4, 1, 5]}], db_size=6)
    assert map_ == pytest.approx(19 / 36)
    # 1-based positions {1, 3}: P@1 = 1, P@5 = 2/3, P@10 = 2/3
    assert mpr == pytest.approx([1.0, 2 / 3, 2 / 3])
    # no positive retrieved at all -> AP = 0 and P@k = 0 (the query still counts)
    map_, aps, mpr, _ = compute_map(ranks, [{"ok": [5]}], db_size=6)
    assert map_ == 0.0 and mpr == pytest.approx([0.0, 0.0, 0.0])


def test_mpk_quirk_denominator_is_last_positive():
    # one positive at 1-based rank 2 of 10: k=5 -> k_q = 2 -> P = 1/2 (a plain P@5 would be 1/5);
    # k=1 -> k_q = 1 -> 0.
    ranks = np.arange(10)[:, None]
    _, _, mpr, _ = compute_map(ranks, [{"ok": [1]}], kappas=(1, 5, 10))
    assert mpr == pytest.approx([0.0, 0.5, 0.5])
    # positives at 1-based 1 and 8: k=5 -> k_q = 5 -> 1/5; k=10 -> k_q = 8 -> 2/8
    _, _, mpr, _ = compute_map(ranks, [{"ok": [0, 7]}], kappas=(5, 10))
    assert mpr == pytest.approx([1 / 5, 2 / 8])


@pytest.mark.parametrize("seed", range(6))
def test_compute_map_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    db, nq = int(rng.integers(5, 60)), int(rng.integers(1, 8))
    n_ranked = db if seed % 2 == 0 else int(rng.integers(1, db + 1))  # odd seeds truncate
    ranks = np.stack([rng.permutation(db)[:n_ranked] for _ in range(nq)], axis=1)
    gnd, oks, junks = [], [], []
    for q in range(nq):
        perm = rng.permutation(db)
        n_ok = int(rng.integers(1 if q == 0 else 0, db // 2 + 1))  # query 0 is never empty
        n_junk = int(rng.integers(0, db // 3 + 1))
        ok, junk = perm[:n_ok], perm[n_ok : n_ok + n_junk]
        gnd.append({"ok": ok.tolist(), "junk": junk.tolist()})
        oks.append(ok)
        junks.append(junk)
    kappas = (1, 3, 5, 10)
    map_, aps, mpr, prs = compute_map(ranks, gnd, kappas, db_size=db)
    ref_map, ref_mpr = brute_force_map(ranks, oks, junks, kappas)
    assert map_ == pytest.approx(ref_map, abs=1e-12)
    assert mpr == pytest.approx(ref_mpr, abs=1e-12)
    for q in range(nq):
        ap, prk = brute_force(ranks[:, q], oks[q], junks[q], kappas)
        if ap is None:
            assert np.isnan(aps[q])
        else:
            assert aps[q] == pytest.approx(float(ap), abs=1e-12)
            assert prs[q] == pytest.approx([float(p) for p in prk], abs=1e-12)


def test_long_rankings_read_in_blocks_match_brute_force():
    # more rows than one internal read block (65,536): hits straddle block boundaries
    rng = np.random.default_rng(7)
    db, nq = 2 * 65536 + 7, 3
    ranks = np.stack([rng.permutation(db) for _ in range(nq)], axis=1).astype(np.int32)
    gnd = []
    for q in range(nq):
        # positives and junk taken from rows around the block boundaries of column q
        rows = rng.permutation(np.r_[65530:65542, 131068:131079, 0:5])
        ids = ranks[rows, q]
        gnd.append({"easy": ids[:8], "hard": ids[8:16], "junk": ids[16:]})
    res = evaluate_revisited(ranks, gnd, db_size=db)
    for setup, (ok_keys, junk_keys) in {
        "easy": (["easy"], ["junk", "hard"]),
        "medium": (["easy", "hard"], ["junk"]),
        "hard": (["hard"], ["junk", "easy"]),
    }.items():
        oks = [np.concatenate([g[k] for k in ok_keys]) for g in gnd]
        junks = [np.concatenate([g[k] for k in junk_keys]) for g in gnd]
        ref_map, ref_mpr = brute_force_map(ranks, oks, junks, (1, 5, 10))
        assert res[setup]["map"] == pytest.approx(ref_map, abs=1e-12)
        assert list(res[setup]["mp@k"].values()) == pytest.approx(ref_mpr, abs=1e-12)
    # a repeat far apart in one column (different blocks) is found and located
    ranks[100_000, 2] = ranks[3, 2]
    with pytest.raises(ValueError, match="column 2 .* repeats"):
        evaluate_revisited(ranks, gnd)


def test_accepts_jax_arrays_and_int32():
    ranks = np.array([[20, 10, 30, 21, 11, 31]]).T
    gnd = [{"ok": jnp.array([10, 11]), "junk": np.array([20, 21], dtype=np.int32)}]
    a, *_ = compute_map(jnp.asarray(ranks, dtype=jnp.int32), gnd)
    assert a == pytest.approx(19 / 24)


# ---------------------------------------------------------------------------------------------
# Revisited setups

# One database of 8 images, two queries.
# Query 0: column [3, 0, 5, 1, 7, 2, 6, 4], easy = {0, 2}, hard = {1, 4}, junk = {5}
#   positions: 0->1, 2->5, 1->3, 4->7, 5->2, 3->0, 7->4, 6->6
#   Easy:   ok {0, 2} at 1, 5; junk {5, 1, 4} at 2, 3, 7 -> compacted 1, 3
#           AP = ((0 + 1/2)/2 + (1/3 + 2/4)/2) / 2 = (1/4 + 5/12) / 2 = 1/3
#           1-based {2, 4}: P@1 = 0 (k_q 1), P@5 = 2/4 (k_q 4), P@10 = 2/4
#   Medium: ok {0, 2, 1, 4} at 1, 3, 5, 7; junk {5} at 2 -> compacted 1, 2, 4, 6
#           trapezoids (0+1/2)/2, (1/2+2/3)/2, (2/4+3/5)/2, (3/6+4/7)/2
#           AP = (1/2 + 7/6 + 11/10 + 15/14) / 2 / 4 = (806/210) / 8 = 403/840
#           1-based {2, 3, 5, 7}: P@1 = 0, P@5 = 3/5, P@10 = 4/7 (k_q 7)
#   Hard:   ok {1, 4} at 3, 7; junk {5, 0, 2} at 1, 2, 5 -> compacted 1, 4
#           AP = ((0 + 1/2)/2 + (1/4 + 2/5)/2) / 2 = (1/4 + 13/40) / 2 = 23/80
#           1-based {2, 5}: P@1 = 0, P@5 = 2/5, P@10 = 2/5
# Query 1: column [6, 0, 1, 2, 3, 4, 5, 7], easy = {6}, hard = {}, junk = {}
#   Easy = Medium: AP 1, P@k 1; Hard: no positive -> NaN, excluded.
RANKS = np.array([[3, 0, 5, 1, 7, 2, 6, 4], [6, 0, 1, 2, 3, 4, 5, 7]]).T
GND = [
    {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [0, 2], "hard": [1, 4], "junk": [5]},
    {"bbx": [1.0, 1.0, 4.0, 4.0], "easy": [6], "hard": [], "junk": []},
]
AP0 = {"easy": 1 / 3, "medium": 403 / 840, "hard": 23 / 80}
PK0 = {"easy": [0, 1 / 2, 1 / 2], "medium": [0, 3 / 5, 4 / 7], "hard": [0, 2 / 5, 2 / 5]}


def test_evaluate_revisited_hand_computed():
    res = evaluate_revisited(RANKS, GND, db_size=8)
    assert set(res) == {"easy", "medium", "hard"}
    for setup in ("easy", "medium"):
        assert res[setup]["aps"] == pytest.approx([AP0[setup], 1.0])
        assert res[setup]["map"] == pytest.approx((AP0[setup] + 1.0) / 2)
        want = [(p + 1.0) / 2 for p in PK0[setup]]
        assert [res[setup]["mp@k"][k] for k in (1, 5, 10)] == pytest.approx(want)
    assert res["hard"]["aps"][0] == pytest.approx(AP0["hard"]) and np.isnan(res["hard"]["aps"][1])
    assert res["hard"]["map"] == pytest.approx(AP0["hard"])
    assert list(res["hard"]["mp@k"].values()) == pytest.approx(PK0["hard"])


def test_swapping_easy_and_hard_swaps_setups():
    swapped = [{**g, "easy": g["hard"], "hard": g["easy"]} for g in GND]
    res, res_sw = evaluate_revisited(RANKS, GND), evaluate_revisited(RANKS, swapped)
    for a, b in (("easy", "hard"), ("hard", "easy"), ("medium", "medium")):
        np.testing.assert_allclose(res_sw[a]["aps"], res[b]["aps"])
        assert res_sw[a]["mp@k"] == pytest.approx(res[b]["mp@k"])


def test_setup_gnd_definitions():
    easy, medium, hard = (setup_gnd(GND, s)[0] for s in ("easy", "medium", "hard"))
    assert sorted(easy["ok"]) == [0, 2] and sorted(easy["junk"]) == [1, 4, 5]
    assert sorted(medium["ok"]) == [0, 1, 2, 4] and sorted(medium["junk"]) == [5]
    assert sorted(hard["ok"]) == [1, 4] and sorted(hard["junk"]) == [0, 2, 5]
    with pytest.raises(ValueError, match="setup"):
        setup_gnd(GND, "extreme")


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_revisited_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    db, nq = 50, 5
    ranks = np.stack([rng.permutation(db) for _ in range(nq)], axis=1)
    gnd = []
    for q in range(nq):
        perm = rng.permutation(db)
        lo = 1 if q == 0 else 0  # query 0 has easy and hard positives: no setup is all empty
        ne, nh, nj = int(rng.integers(lo, 8)), int(rng.integers(lo, 8)), int(rng.integers(0, 8))
        gnd.append(
            {"easy": perm[:ne], "hard": perm[ne : ne + nh], "junk": perm[ne + nh : ne + nh + nj]}
        )
    res = evaluate_revisited(ranks, gnd, db_size=db)

    def union(g, keys):
        return np.concatenate([np.asarray(g[k], dtype=int) for k in keys])

    defs = {
        "easy": (["easy"], ["junk", "hard"]),
        "medium": (["easy", "hard"], ["junk"]),
        "hard": (["hard"], ["junk", "easy"]),
    }
    for setup, (ok_keys, junk_keys) in defs.items():
        oks = [union(g, ok_keys) for g in gnd]
        junks = [union(g, junk_keys) for g in gnd]
        ref_map, ref_mpr = brute_force_map(ranks, oks, junks, (1, 5, 10))
        assert res[setup]["map"] == pytest.approx(ref_map, abs=1e-12)
        assert list(res[setup]["mp@k"].values()) == pytest.approx(ref_mpr, abs=1e-12)


def test_evaluate_old_and_jret_layout():
    # scores (nq=1, db=5) -> ids by decreasing score -> revisitop layout
    scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.3]])
    ids = np.argsort(-scores, axis=1, kind="stable")  # [[1, 3, 2, 4, 0]]
    ranks = ranks_from_ids(ids)
    assert ranks.shape == (5, 1) and ranks[:, 0].tolist() == [1, 3, 2, 4, 0]
    # ok = {1, 2}, junk = {3}: raw positions 0, 2; junk at 1 -> compacted 0, 1 -> AP = 1
    res = evaluate_old(ranks, [{"ok": [1, 2], "junk": [3]}], db_size=5)
    assert res["map"] == pytest.approx(1.0) and res["mp@k"] == {1: 1.0, 5: 1.0, 10: 1.0}
    # ok = {0, 2}, junk = {}: positions 2, 4: ((0+1/3)/2 + (1/4+2/5)/2)/2 = (1/6 + 13/40)/2 = 59/240
    res = evaluate_old(ranks, [{"ok": [0, 2], "junk": []}])
    assert res["aps"] == pytest.approx([59 / 240])


def test_ranks_from_ids_accepts_jax_and_rejects_floats():
    ids = jnp.array([[2, 0, 1], [1, 2, 0]], dtype=jnp.int32)
    np.testing.assert_array_equal(ranks_from_ids(ids), np.array(ids).T)
    with pytest.raises(ValueError, match="ids"):
        ranks_from_ids(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ids"):
        ranks_from_ids(np.arange(3))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "ranks, gnd, kwargs, match",
    [
        (np.arange(4), [{"ok": [0]}], {}, "ranks: expected a 2-D"),
        (np.zeros((4, 1)), [{"ok": [0]}], {}, "ranks: expected an integer"),
        (np.arange(4)[:, None], [{"ok": [0]}, {"ok": [1]}], {}, "gnd: expected 1 entries"),
        (np.arange(4)[:, None], [{"junk": [0]}], {}, r"gnd\[0\]: missing key 'ok'"),
        (np.arange(4)[:, None], ["ok"], {}, r"gnd\[0\]: expected a dict"),
        (np.arange(4)[:, None], [{"ok": [0]}], {"db_size": 3}, r"ranks: expected ids in \[0, 3\)"),
        (np.array([[0], [-1]]), [{"ok": [0]}], {}, "ranks: expected ids in non-negative"),
        (np.array([[0, 1], [1, 1]]), [{"ok": [0]}] * 2, {}, "column 1 .* repeats"),
        (np.arange(4)[:, None], [{"ok": [0, 9]}], {"db_size": 4}, r"gnd\[0\]\['ok'\]: expected"),
        (np.arange(4)[:, None], [{"ok": [1, 1]}], {}, r"gnd\[0\]\['ok'\]: repeated"),
        (np.arange(4)[:, None], [{"ok": [1], "junk": [1]}], {}, "'ok' and 'junk' share"),
        (np.arange(4)[:, None], [{"ok": [0.5]}], {}, r"gnd\[0\]\['ok'\]: expected an integer"),
        (np.arange(4)[:, None], [{"ok": [0]}], {"kappas": (1, 0)}, r"kappas\[1\]"),
        (np.arange(4)[:, None], [{"ok": [0]}], {"db_size": 0}, "db_size"),
    ],
)
def test_compute_map_bad_input(ranks, gnd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_map(ranks, gnd, **kwargs)


def test_validate_false_skips_value_checks():
    ranks = np.array([[0], [0], [1]])  # repeated id: rejected when validating
    with pytest.raises(ValueError, match="repeats"):
        compute_map(ranks, [{"ok": [1]}])
    map_, *_ = compute_map(ranks, [{"ok": [1]}], validate=False)
    # ok {1} at position 2 -> (0 + 1/3) / 2 = 1/6
    assert map_ == pytest.approx(1 / 6)


def test_evaluate_revisited_bad_input():
    with pytest.raises(ValueError, match=r"gnd\[1\]: missing key 'hard'"):
        evaluate_revisited(RANKS, [GND[0], {"easy": [6], "junk": []}])
    bad = [GND[0], {**GND[1], "hard": [6]}]
    with pytest.raises(ValueError, match=r"gnd\[1\]: 'easy' and 'hard' share"):
        evaluate_revisited(RANKS, bad)
    bad = [{**GND[0], "junk": [0]}, GND[1]]
    with pytest.raises(ValueError, match=r"gnd\[0\]: 'easy' and 'junk' share"):
        evaluate_revisited(RANKS, bad)
    with pytest.raises(ValueError, match=r"gnd\[0\]\['hard'\]: expected indices in \[0, 8\)"):
        evaluate_revisited(RANKS, [{**GND[0], "hard": [8]}, GND[1]], db_size=8)
    with pytest.raises(ValueError, match="gnd: expected 2 entries"):
        evaluate_revisited(RANKS, GND[:1])


def test_evaluate_old_requires_junk_key():
    with pytest.raises(ValueError, match=r"gnd\[0\]: missing key 'junk'"):
        evaluate_old(np.arange(3)[:, None], [{"ok": [0]}])
