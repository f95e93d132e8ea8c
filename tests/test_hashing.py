"""jret.hashing against numpy transcriptions (ITQ, KMH, RBA steps) and brute-force Hamming search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_on_devices

from jret import hashing, kernels

RNG = np.random.default_rng(0)


def np_pack(bits):
    """Little-endian bit order inside bytes, bytes into little-endian uint32 words."""
    bits = np.asarray(bits, bool)
    L = bits.shape[-1]
    pad = (-L) % 32
    b = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), bool)], -1)
    return np.packbits(b, axis=-1, bitorder="little").view("<u4")


def np_hamming(a, b):
    ua = np.unpackbits(a.view(np.uint8), axis=-1)
    ub = np.unpackbits(b.view(np.uint8), axis=-1)
    return (ua[:, None, :] != ub[None, :, :]).sum(-1)


def brute_force(q, x, k):
    d = np_hamming(q, x)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return -np.take_along_axis(d, ids, 1).astype(np.float32), ids


@pytest.mark.parametrize(
    ("n", "k", "chunk", "qchunk", "bits"),
    [
        (500, 10, 64, None, 32),  # direct merge of the running top-k
        (2000, 5, 512, None, 20),  # two-level block selection, many ties
        (333, 333, 100, 4, 8),
        (257, 5, 1000, None, 64),
        (40, 7, 7, 3, 3),
    ],
)
def test_hamming_knn_matches_brute_force(n, k, chunk, qchunk, bits):
    x = np_pack(RNG.random((n, bits)) > 0.5)
    q = np_pack(RNG.random((9, bits)) > 0.5)
    scores, ids = hashing.hamming_knn(q, x, k, chunk_size=chunk, query_chunk_size=qchunk)
    ref_s, ref_i = brute_force(q, x, k)
    assert scores.dtype == jnp.float32 and ids.dtype == jnp.int32 and ids.shape == (9, k)
    np.testing.assert_array_equal(ids, ref_i)  # short codes: many ties, lower id first
    np.testing.assert_array_equal(scores, ref_s)


def test_hamming_knn_jit_and_sign_code_equivalence():
    V = RNG.normal(size=(200, 48)).astype(np.float32)
    codes = kernels.pack_bits(V >= 0)
    jitted = jax.jit(lambda q, x: hashing.hamming_knn_chunked(q, x, 15, chunk_size=64))
    s1, i1 = jitted(codes[:6], codes)
    s2, i2 = hashing.hamming_knn(codes[:6], codes, 15)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    B = np.where(V >= 0, 1.0, -1.0)
    np.testing.assert_allclose(
        48 + 2 * np.asarray(s1), np.take_along_axis(B[:6] @ B.T, np.asarray(i1), 1)
    )


def test_hamming_knn_sharded_equals_single_device():
    run_on_devices(
        """
        import jax, numpy as np
        from jax.sharding import Mesh
        from jret import hashing, kernels
        rng = np.random.default_rng(1)
        x = kernels.pack_bits(rng.random((1003, 20)) > 0.5)
        q = kernels.pack_bits(rng.random((5, 20)) > 0.5)
        mesh = Mesh(np.array(jax.devices()), ("db",))
        for k in (1, 200):  # k = 1: the chunk would allow the two-level block selection
            s1, i1 = hashing.hamming_knn_sharded(q, x, k, mesh, chunk_size=32)
            s2, i2 = hashing.hamming_knn(q, x, k)
            assert (np.asarray(i1) == np.asarray(i2)).all(), k
            assert (np.asarray(s1) == np.asarray(s2)).all(), k
        print("ok")
        """
    )


def test_hamming_benchmark_agrees_with_faiss(tmp_path):
    """experiments/benchmarks/hamming.py on tiny sizes: faiss IndexBinaryFlat returns the same
    k distances, and they are those of the ids jret returns."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments/benchmarks/hamming.py"
    spec = importlib.util.spec_from_file_location("jret_hamming_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--nq", "7", "--sizes", "300", "2000", "--bits", "64", "--k", "20", "--repeats", "1"]
    rows = bench.main([*argv, "--chunk-size", "512", "--out", str(tmp_path)])
    assert [(r["n"], r["bits"]) for r in rows] == [(300, 64), (2000, 64)]
    assert all(r["distances_equal"] and r["jret_distances_hold"] for r in rows)
    saved = json.loads((tmp_path / "hamming_cpu.json").read_text())
    assert saved["args"]["sizes"] == [300, 2000] and (tmp_path / "hamming_cpu.md").stat().st_size


# ------------------------------------------------------------------------------------------------
# Hash functions


def np_itq(V, R, iters):
    """Gong & Lazebnik: B = sgn(VR); SVD of VᵀB = UΣŴᵀ; R = UŴᵀ."""
    for _ in range(iters):
        B = np.where(V @ R >= 0, 1.0, -1.0)
        U, _, Wt = np.linalg.svd(V.T @ B)
        R = U @ Wt
    return R


def clustered(n=600, dim=32, clusters=12, noise=0.3):
    centres = RNG.normal(size=(clusters, dim))
    labels = RNG.integers(0, clusters, n)
    return (centres[labels] + noise * RNG.normal(size=(n, dim))).astype(np.float32)


def test_itq_rotation_matches_transcription():
    X = clustered()
    V = (X - X.mean(0)) @ np.linalg.eigh(np.cov(X.T))[1][:, -16:]
    R0 = np.asarray(hashing.random_orthogonal(jax.random.key(3), 16), np.float64)
    np.testing.assert_allclose(R0 @ R0.T, np.eye(16), atol=1e-5)
    got = np.asarray(
        hashing.itq_rotation(jnp.asarray(V, jnp.float32), jnp.asarray(R0, jnp.float32), 10)
    )
    np.testing.assert_allclose(got, np_itq(V, R0, 10), atol=2e-3)
    losses = [
        np.sum((np.where(V @ R >= 0, 1, -1) - V @ R) ** 2)
        for R in (np_itq(V, R0, i) for i in range(6))
    ]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False))


def test_itq_learn_and_encode():
    X = clustered()
    key = jax.random.key(0)
    h = hashing.itq_learn(key, X, 16)
    rr = hashing.random_rotation_learn(key, X, 16)
    assert h.nbits == 16 and h.W.shape == (32, 16)
    codes = np.asarray(hashing.encode(X, h))
    np.testing.assert_array_equal(codes, np_pack((X - np.asarray(h.m)) @ np.asarray(h.W) >= 0))
    np.testing.assert_array_equal(jax.jit(hashing.encode)(X, h), codes)
    assert np.asarray(hashing.hash_bits(np.asarray(h.m)[None], h)).all()  # sign(0) -> +1
    Xc = X.astype(np.float64) - X.mean(0)
    E = np.linalg.eigh(Xc.T @ Xc / len(X))[1][:, -16:]  # the 16 leading principal directions
    W = np.asarray(h.W, np.float64)
    np.testing.assert_allclose(W @ W.T, E @ E.T, atol=1e-4)  # ITQ rotates within that subspace

    def quantisation_loss(hasher):
        V = (X - np.asarray(hasher.m)) @ np.asarray(hasher.W)
        return np.sum((np.where(V >= 0, 1.0, -1.0) - V) ** 2)

    assert quantisation_loss(h) < quantisation_loss(rr)
    W_rr = np.asarray(rr.W)
    np.testing.assert_allclose(W_rr.T @ W_rr, np.eye(16), atol=1e-4)  # PCA basis × rotation
    plain = hashing.random_rotation_learn(key, X, 16, pca=False)
    np.testing.assert_allclose(plain.m, X.mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(plain.W).T @ np.asarray(plain.W), np.eye(16), atol=1e-5)


def test_itq_preserves_neighbours_better_than_random_rotation():
    """Held-out data from the learning distribution: ITQ's Hamming neighbours overlap the
    Euclidean ones more than PCA + random rotation's (Gong & Lazebnik's comparison)."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 48))
    scale = rng.normal(size=(48, 48)) * np.linspace(1.0, 0.1, 48)

    def draw(n):
        return ((centres[rng.integers(0, 40, n)] + 0.7 * rng.normal(size=(n, 48))) @ scale).astype(
            np.float32
        )

    train, db, q = draw(1500), draw(1000), draw(50)
    truth = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1)[:, :50]

    def precision(h):
        _, ids = hashing.hamming_knn(hashing.encode(q, h), hashing.encode(db, h), 50)
        return np.mean(
            [len(set(a) & set(b)) / 50 for a, b in zip(np.asarray(ids), truth, strict=True)]
        )

    keys = [jax.random.key(s) for s in range(3)]
    itq = np.mean([precision(hashing.itq_learn(k, train, 16)) for k in keys])
    rr = np.mean([precision(hashing.random_rotation_learn(k, train, 16)) for k in keys])
    assert itq > rr + 0.03


def np_kmh_energy(C, means, w, lam, b):
    K = len(C)
    h = np.array([[bin(i ^ j).count("1") for j in range(K)] for i in range(K)], float)
    d = np.sqrt(((C[:, None] - C[None]) ** 2).sum(-1))
    ww = np.outer(w, w)
    s = (ww * d * np.sqrt(h)).sum() / (ww * h).sum()
    return (w * ((C - means) ** 2).sum(-1)).sum() + lam * (ww * (d - s * np.sqrt(h)) ** 2).sum()


def np_affinity_error(C, Z):
    """Relative KMH affinity error of codewords ``C (K, d)`` on data ``Z (n, d)``, ``s`` optimal."""
    K = len(C)
    idx = np.argmin(((Z[:, None] - C[None]) ** 2).sum(-1), axis=1)
    w = np.bincount(idx, minlength=K) / len(Z)
    h = np.array([[bin(i ^ j).count("1") for j in range(K)] for i in range(K)], float)
    d = np.sqrt(((C[:, None] - C[None]) ** 2).sum(-1))
    ww = np.outer(w, w)
    s = (ww * d * np.sqrt(h)).sum() / (ww * h).sum()
    return (ww * (d - s * np.sqrt(h)) ** 2).sum() / (ww * d**2).sum()


def test_kmh_energy_and_encoding():
    C, means = RNG.normal(size=(8, 5)), RNG.normal(size=(8, 5))
    w = RNG.dirichlet(np.ones(8))
    hroot = hashing.index_hamming_root(3)
    got = hashing.kmh_energy(jnp.asarray(C), jnp.asarray(means), jnp.asarray(w), 10.0, hroot)
    np.testing.assert_allclose(got, np_kmh_energy(C, means, w, 10.0, 3), rtol=1e-4)
    X = clustered(400, 16)
    h = hashing.kmh_learn(X, 8, bits_per_subspace=4, iters=4, steps=20)
    assert h.nbits == 8 and h.codewords.shape == (2, 16, 8)
    bits = np.asarray(hashing.hash_bits(X, h))
    Z = np.einsum("nd,sdk->snk", X - np.asarray(h.m), np.asarray(h.P))
    C = np.asarray(h.codewords)
    for s in range(2):
        idx = np.argmin(((Z[s][:, None] - C[s][None]) ** 2).sum(-1), axis=1)
        np.testing.assert_array_equal(
            bits[:, 4 * s : 4 * s + 4], (idx[:, None] >> np.arange(4)) & 1
        )
    # the affinity term makes codeword distances follow the Hamming distances of their indices
    plain = hashing.kmh_learn(X, 8, bits_per_subspace=4, lam=0.0, iters=4, steps=20)
    Cp = np.asarray(plain.codewords)
    kmh_err = np.mean([np_affinity_error(C[s], Z[s]) for s in range(2)])
    plain_err = np.mean([np_affinity_error(Cp[s], Z[s]) for s in range(2)])
    assert kmh_err < 0.5 * plain_err


def test_rba_steps_match_transcription():
    X = clustered(200, 12)
    Xc = X - X.mean(0)
    p = hashing.RBAParams(
        W=jnp.asarray(RNG.normal(size=(12, 6)), jnp.float32),
        b=jnp.asarray(RNG.normal(size=6), jnp.float32),
        D=jnp.asarray(RNG.normal(size=(12, 6)), jnp.float32),
        c=jnp.asarray(RNG.normal(size=12), jnp.float32),
    )
    W, b, D, c = (np.asarray(a, np.float64) for a in p)
    H = Xc @ W + b
    B = np.sign(np.linalg.solve(D.T @ D + 1.0 * np.eye(6), (D.T @ (Xc - c).T + H.T))).T
    np.testing.assert_array_equal(hashing.rba_codes_step(p, jnp.asarray(Xc), 1.0), B)
    loss = (np.sum((Xc - B @ D.T - c) ** 2) + np.sum((H - B) ** 2)) / 400 + 1e-3 * (
        np.sum(W**2) + np.sum(D**2)
    ) / 2
    np.testing.assert_allclose(
        hashing.rba_loss(p, jnp.asarray(Xc), jnp.asarray(B), 1.0, 1e-3), loss, rtol=1e-4
    )


def test_rba_learn_encodes_neighbourhoods():
    X = clustered(300, 16, clusters=6, noise=0.2)
    h = hashing.rba_learn(jax.random.key(0), X, 8, iters=3, steps=20)
    codes = hashing.encode(X, h)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(hashing.encode(X, h)))
    _, ids = hashing.hamming_knn(codes, codes, 5)
    eucl = ((X[:, None] - X[None]) ** 2).sum(-1)
    d_found = np.take_along_axis(eucl, np.asarray(ids), 1).mean()
    assert d_found < 0.5 * eucl.mean()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: hashing.hamming_knn(np.zeros((2, 2), np.int32), np.zeros((5, 2), np.uint32), 1),
            "uint32",
        ),
        (
            lambda: hashing.hamming_knn(
                np.zeros((2, 2), np.uint32), np.zeros((5, 3), np.uint32), 1
            ),
            "mismatch",
        ),
        (
            lambda: hashing.hamming_knn(
                np.zeros((2, 2), np.uint32), np.zeros((5, 2), np.uint32), 6
            ),
            "at most n",
        ),
        (
            lambda: hashing.hamming_knn(
                np.zeros((2, 2), np.uint32), np.zeros((0, 2), np.uint32), 1
            ),
            "at least",
        ),
        (
            lambda: hashing.hamming_knn(np.zeros((2,), np.uint32), np.zeros((5, 2), np.uint32), 1),
            "queries",
        ),
        (lambda: hashing.itq_learn(jax.random.key(0), clustered(50, 8), 9), "at most"),
        (
            lambda: hashing.itq_learn(jax.random.key(0), np.full((5, 4), np.nan, np.float32), 2),
            "NaN",
        ),
        (lambda: hashing.kmh_learn(clustered(50, 16), 10), "multiple"),
        (lambda: hashing.kmh_learn(clustered(50, 6), 4, bits_per_subspace=0), "positive"),
        (
            lambda: hashing.encode(
                np.zeros((3, 5), np.float32),
                hashing.itq_learn(jax.random.key(0), clustered(50, 8), 4),
            ),
            "dimension",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
