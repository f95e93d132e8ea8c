"""jret.ivf: parity with the asmk package, a dense ASMK reference, updates, files, sharding."""

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_on_devices

from jret import codebook, ivf, kernels

# the benchmark's asmk driver (its file shares the asmk package's name: load it by path)
_spec = importlib.util.spec_from_file_location(
    "jret_asmk_benchmark",
    pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "asmk.py",
)
asmk_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(asmk_benchmark)
HAVE_ASMK = importlib.util.find_spec("asmk") is not None

RNG = np.random.default_rng(0)
D, K = 16, 24
CENTROIDS = RNG.normal(size=(K, D)).astype(np.float32)


def flat_images(n, centroids, lo=5, hi=40, noise=0.6):
    """Flat descriptors near random words of the codebook, with an image id per row."""
    k, d = centroids.shape
    des, ids = [], []
    for i in range(n):
        m = int(RNG.integers(lo, hi))
        words = RNG.integers(0, k, m)
        des.append(centroids[words] + noise * RNG.normal(size=(m, d)))
        ids.append(np.full(m, i))
    return np.concatenate(des).astype(np.float32), np.concatenate(ids)


def padded_images(n=30, m=20, p=0.7):
    x = (CENTROIDS[RNG.integers(0, K, (n, m))] + 0.5 * RNG.normal(size=(n, m, D))).astype(
        np.float32
    )
    return x, RNG.random((n, m)) < p


@pytest.mark.skipif(not HAVE_ASMK, reason="the asmk package is not installed (bench extra)")
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("use_idf", [False, True])
def test_parity_with_asmk_package(binary, use_idf):
    d, k = 128, 64
    centroids = RNG.normal(size=(k, d)).astype(np.float32)
    X, xi = flat_images(300, centroids)
    # query j: a noisy part of database image 3 j, so that true matches score high
    keep = (xi % 3 == 0) & (xi < 60) & (RNG.random(len(xi)) < 0.7)
    Q = (X[keep] + 0.2 * RNG.normal(size=(keep.sum(), d))).astype(np.float32)
    qi = xi[keep] // 3
    method = asmk_benchmark.asmk_build(centroids, X, xi, binary, use_idf)
    q_images, ref_ids, ref_scores = method.query_ivf(Q, qi)[1:]
    index = ivf.build(centroids, X, xi, binary=binary, use_idf=use_idf, asmk_compat=True)
    scores, ids = ivf.search(index, Q, qi)
    np.testing.assert_array_equal(q_images, np.arange(20))
    np.testing.assert_allclose(
        asmk_benchmark.dense(scores, ids, 300),
        asmk_benchmark.dense(ref_scores, ref_ids, 300),
        rtol=0,
        atol=1e-5,
    )
    assert np.asarray(scores)[:, 0].min() > 0.02  # not a comparison of near-zero scores
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], 3 * np.arange(20))
    assert asmk_benchmark.same_ranking(ids, ref_ids, ref_scores)


def test_contract_call_forms():
    """The issue's calls: build(centroids, des, image_ids, kernel, binary, multiple_assignment,
    use_idf) positionally, search(..., k=, alpha=, tau=, multiple_assignment=)."""
    X, xi = flat_images(12, CENTROIDS)
    index = ivf.build(CENTROIDS, X, xi, "asmk", True, 1, False)
    ref = ivf.build(CENTROIDS, X, xi, kernel="asmk", binary=True, multiple_assignment=1)
    for a, b in zip(jax.tree.leaves(index), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = xi < 3
    scores, ids = ivf.search(index, X[q], xi[q], k=5, alpha=3.0, tau=0.0, multiple_assignment=5)
    s2, i2 = ivf.search(index, X[q], xi[q], 5, 3.0, 0.0, 5)
    assert ids.shape == scores.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(i2))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(s2))


@pytest.mark.parametrize("binary", [True, False])
def test_search_matches_dense_asmk(binary):
    X, xm = padded_images()
    Q, qm = padded_images(4)
    index = ivf.build(CENTROIDS, X, mask=xm, binary=binary)
    scores, ids = ivf.search(index, Q, mask=qm, chunk_size=37)
    dbs = kernels.aggregate(X, xm, codebook.quantize(X, CENTROIDS, 1), CENTROIDS, binary)
    qs = kernels.aggregate(Q, qm, codebook.quantize(Q, CENTROIDS, 5), CENTROIDS, binary)
    ref = np.asarray(kernels.pairwise(kernels.asmk, qs, dbs, binary=binary, nbits=D))
    np.testing.assert_allclose(asmk_benchmark.dense(scores, ids, 30), ref, atol=1e-5)
    order = np.argsort(-ref, axis=1, kind="stable")
    assert asmk_benchmark.same_ranking(ids, order, np.take_along_axis(ref, order, 1))
    assert not asmk_benchmark.same_ranking(ids, order[:, ::-1], np.take_along_axis(ref, order, 1))


def test_flat_and_padded_input_agree_and_ids_are_returned():
    X, xm = padded_images()
    ids = 10 * np.arange(30) + 3
    by_pad = ivf.build(CENTROIDS, X, ids, mask=xm)
    flat_ids = np.repeat(ids, xm.sum(1))
    by_flat = ivf.build(CENTROIDS, X[xm], flat_ids)
    Q, qm = padded_images(4)
    s1, i1 = ivf.search(by_pad, Q, mask=qm)
    s2, i2 = ivf.search(by_flat, Q, mask=qm)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert set(np.asarray(i1).ravel()) == set(ids)
    # flat queries: rows follow the sorted distinct query ids
    qid = np.repeat([7, 2, 5, 9], qm.sum(1))
    s3, _ = ivf.search(by_pad, Q[qm], qid)
    np.testing.assert_array_equal(np.asarray(s3), np.asarray(s1)[[1, 2, 0, 3]])


@pytest.mark.parametrize("use_idf", [False, True])
def test_add_equals_build_on_everything(use_idf):
    X, xm = padded_images()
    full = ivf.build(CENTROIDS, X, mask=xm, use_idf=use_idf)
    part = ivf.build(CENTROIDS, X[:13], mask=xm[:13], use_idf=use_idf)
    grown = ivf.add(part, X[13:], mask=xm[13:])
    for name in ("offsets", "entry_image", "entry_data", "image_ids", "weights", "norm"):
        np.testing.assert_array_equal(
            np.asarray(getattr(grown, name)), np.asarray(getattr(full, name))
        )
    with pytest.raises(ValueError, match="already in the index"):
        ivf.add(part, X[:2], np.array([0, 99]), mask=xm[:2])


def test_topk_full_ranking_and_ties():
    X, xm = padded_images()
    xm[5:9] = False  # four images without features score 0: ties kept in index order
    index = ivf.build(CENTROIDS, X, mask=xm)
    Q, qm = padded_images(4)
    full_s, full_i = ivf.search(index, Q, mask=qm)
    top_s, top_i = ivf.search(index, Q, mask=qm, k=7)
    np.testing.assert_array_equal(np.asarray(top_i), np.asarray(full_i)[:, :7])
    np.testing.assert_array_equal(np.asarray(top_s), np.asarray(full_s)[:, :7])
    assert np.all(np.diff(np.asarray(full_s), axis=1) <= 0)
    for row, s in zip(np.asarray(full_i), np.asarray(full_s), strict=True):
        zeros = row[s == 0]
        np.testing.assert_array_equal(zeros, np.sort(zeros))
        assert {5, 6, 7, 8} <= set(zeros)
    empty_s, _ = ivf.search(index, Q, mask=np.zeros_like(qm))
    assert not np.asarray(empty_s).any()


def test_score_sets_jit_and_chunking():
    X, xm = padded_images()
    index = ivf.build(CENTROIDS, X, mask=xm)
    sets, _ = ivf.aggregate_queries(index, *padded_images(4)[:1])
    eager = ivf.score_sets(index, sets, chunk_size=3)
    jitted = jax.jit(ivf.score_sets, static_argnames="chunk_size")(index, sets)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-6)
    # image_sets gives back exactly the indexed entries
    db = ivf.image_sets(index, np.arange(30))
    ref = kernels.aggregate(X, xm, codebook.quantize(X, CENTROIDS, 1), CENTROIDS)
    for i in range(30):
        n = int(np.asarray(ref.mask[i]).sum())
        np.testing.assert_array_equal(np.asarray(db.words[i])[:n], np.asarray(ref.words[i])[:n])
        np.testing.assert_array_equal(np.asarray(db.data[i])[:n], np.asarray(ref.data[i])[:n])
        assert not np.asarray(db.mask[i])[n:].any()


def test_stats():
    X, xm = padded_images()
    index = ivf.build(CENTROIDS, X, mask=xm)
    st = ivf.stats(index)
    words = np.asarray(
        kernels.aggregate(X, xm, codebook.quantize(X, CENTROIDS, 1), CENTROIDS).words
    )
    counts = np.bincount(words[words >= 0], minlength=K).astype(float)
    assert st["images"] == 30 and st["entries"] == counts.sum()
    assert st["empty_words"] == (counts == 0).sum()
    assert st["imbalance_factor"] == pytest.approx(K * (counts**2).sum() / counts.sum() ** 2)
    assert st["bytes"] == counts.sum() * (4 + 4) + (K + 1) * 4  # one uint32 code + int32 id


def test_save_load_round_trip_and_errors(tmp_path):
    X, xm = padded_images()
    index = ivf.build(CENTROIDS, X, 5 + np.arange(30), mask=xm, binary=False, use_idf=True)
    path = tmp_path / "db.npz"
    ivf.save(index, path)
    assert os.listdir(tmp_path) == ["db.npz"]  # nothing left from the atomic write
    again = ivf.load(path)
    for a, b in zip(jax.tree.leaves(index), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (again.binary, again.use_idf, again.nbits, again.asmk_compat) == (False, True, D, False)
    Q, qm = padded_images(4)
    np.testing.assert_array_equal(
        np.asarray(ivf.search(index, Q, mask=qm)[1]), np.asarray(ivf.search(again, Q, mask=qm)[1])
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        ivf.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="junk.npz"):
        ivf.load(tmp_path / "junk.npz")
    arrays = dict(np.load(path))
    meta = json.loads(str(arrays["__meta__"]))
    for name, change, match in [
        ("v2.npz", {"__meta__": json.dumps({**meta, "version": 2})}, "version 2"),
        ("other.npz", {"__meta__": json.dumps({**meta, "format": "x"})}, "not a jret index"),
        ("offsets.npz", {"offsets": arrays["offsets"][::-1]}, "corrupt"),
        ("images.npz", {"entry_image": arrays["entry_image"] + 100}, "corrupt"),
    ]:
        np.savez(tmp_path / name, **{**arrays, **change})
        with pytest.raises(ValueError, match=match):
            ivf.load(tmp_path / name)
    np.savez(tmp_path / "partial.npz", **{k: v for k, v in arrays.items() if k != "entry_data"})
    with pytest.raises(ValueError, match="missing arrays: entry_data"):
        ivf.load(tmp_path / "partial.npz")


def test_sharded_search_equals_single_device():
    run_on_devices(
        """
        import jax, numpy as np
        from jax.sharding import Mesh
        from jret import ivf
        rng = np.random.default_rng(1)
        C = rng.normal(size=(16, 8)).astype(np.float32)
        X = rng.normal(size=(37, 12, 8)).astype(np.float32)
        Q = rng.normal(size=(5, 12, 8)).astype(np.float32)
        mesh = Mesh(np.array(jax.devices()), ("db",))
        index = ivf.build(C, X, mask=rng.random((37, 12)) < 0.7, use_idf=True)
        for k in (4, None):
            s0, i0 = ivf.search(index, Q, k=k)
            s1, i1 = ivf.search(index, Q, k=k, mesh=mesh, query_batch=2)
            s2, i2 = ivf.search(index, Q, k=k, query_batch=2)
            assert np.array_equal(np.asarray(i0), np.asarray(i1)), k
            assert np.array_equal(np.asarray(i0), np.asarray(i2)), k
            assert np.allclose(np.asarray(s0), np.asarray(s1), atol=1e-6), k
        print("ok")
        """
    )


X_OK = np.zeros((6, D), np.float32)
IDS_OK = np.arange(6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ivf.build(CENTROIDS, X_OK, IDS_OK, kernel="smk"), "aggregated"),
        (lambda: ivf.build(CENTROIDS, X_OK), "image_ids: required"),
        (lambda: ivf.build(CENTROIDS, X_OK, IDS_OK[:3]), "one id per descriptor"),
        (lambda: ivf.build(CENTROIDS, X_OK, IDS_OK, mask=np.ones(6, bool)), "only for padded"),
        (lambda: ivf.build(CENTROIDS, np.zeros((6, 3), np.float32), IDS_OK), "dimension 16"),
        (lambda: ivf.build(CENTROIDS, np.full((6, D), np.nan, np.float32), IDS_OK), "NaN/inf"),
        (lambda: ivf.build(CENTROIDS, X_OK, -IDS_OK - 1), "non-negative"),
        (lambda: ivf.build(CENTROIDS, X_OK, IDS_OK.astype(float)), "integer dtype"),
        (lambda: ivf.build(CENTROIDS, X_OK.astype(np.int32), IDS_OK), "floating"),
        (lambda: ivf.build(CENTROIDS[:, :0], X_OK, IDS_OK), "dimension 0"),
        (lambda: ivf.build(CENTROIDS, X_OK, IDS_OK, multiple_assignment=K + 1), "at most k"),
        (lambda: ivf.build(CENTROIDS, X_OK[None], np.array([1, 1])), "one id per image"),
        (
            lambda: ivf.build(CENTROIDS, np.zeros((2, 3, D), np.float32), np.array([1, 1])),
            "distinct",
        ),
        (lambda: ivf.build(CENTROIDS, X_OK[None], mask=np.ones((1, 5), bool)), "mask"),
        (lambda: ivf.build(CENTROIDS, X_OK[:0], IDS_OK[:0]), "at least one database image"),
        (lambda: ivf.search(ivf.build(CENTROIDS, X_OK, IDS_OK), X_OK, IDS_OK, k=7), "at most"),
        (
            lambda: ivf.search_sets(
                ivf.build(CENTROIDS, X_OK, IDS_OK),
                kernels.WordSet(np.zeros((2, 4), np.int32), np.zeros((2, 4, 3), np.uint32), None),
            ),
            r"queries.data: expected shape \(2, 4\) \+ \(1,\)",
        ),
        (
            lambda: ivf.score_sets(
                ivf.build(CENTROIDS, X_OK, IDS_OK),
                kernels.WordSet(np.zeros((2, 4), np.int32), np.zeros((2, 4, 1)), np.ones(4, bool)),
            ),
            "queries.mask",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validate_switch():
    nan = np.full((6, D), np.nan, np.float32)
    index = ivf.build(CENTROIDS, nan, IDS_OK, validate=False)
    assert index.n_images == 6 and isinstance(index.norm, jnp.ndarray)
