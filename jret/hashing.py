"""Hashing of global descriptors to compact binary codes, and exhaustive Hamming search.

Seed 004 §4.5 and §5.2.5 (SPEC §10.7): the real-valued image vectors are binarised by an
unsupervised hash function cascaded after the aggregation; ITQ is the seed's final choice
(``M_MAX + φ_Δ(32, 20) + ψ_d + ITQ``), RBA is on par, KMH behind. Codes are ranked by Hamming
distance. Every hash function is fitted on a learning set, never on the test set.

* ITQ (Gong & Lazebnik, CVPR 2011): centre, PCA to ``L`` dims ``V = (X − m) Pᵀ``, random
  orthogonal ``R`` (from a key), then 50 times ``B = sign(VR)`` and ``R = U Ŵᵀ`` from the SVD
  ``VᵀB = U Σ Ŵᵀ`` (orthogonal Procrustes); code ``sign(VR)``. ``iters=0`` is the PCA + random
  rotation baseline; :func:`random_rotation_learn` also gives a random rotation without PCA.
* KMH, k-means hashing (He, Wen & Sun, CVPR 2013): the PCA-rotated data is split into ``S``
  subspaces of ``b`` bits (default 4, i.e. 16 codewords each); the codewords minimise
  ``E_quan + λ E_aff`` (λ = 10), ``E_aff = Σ_{i,j} w_i w_j (‖c_i − c_j‖ − s·√h(i, j))²`` so that
  the Hamming distance ``h`` of codeword *indices* tracks the distance between codewords
  (``w_i`` = cluster fractions, ``s`` fitted in closed form). Alternating assignment and
  Optax-Adam codeword updates; codewords start on the ``±σ`` hypercube of each subspace's ``b``
  leading PCA directions. Subspace ``s`` takes PCA directions ``s, s + S, s + 2S, …`` (balanced
  variance), a jret choice.
* RBA, relaxed binary autoencoder (Do et al.): encoder ``H = (X − m)W + b``, binary auxiliary
  codes ``B ∈ {±1}``, decoder ``X̂ = B Dᵀ + c``; the constraint ``B = sign(H)`` is relaxed into
  the penalty ``µ‖H − B‖²``. Alternation: Optax-Adam steps on
  ``(‖X − X̂‖² + µ‖H − B‖²)/2n + λ(‖W‖² + ‖D‖²)/2``, then ``B = sign((DᵀD + µI)⁻¹(Dᵀ(x − c) + µh))``
  (the binary sub-problem relaxed to least squares, then rounded). Code ``sign(H)``.

Bits are ``x ≥ 0`` (sign(0) → +1, SPEC §10.7), packed into uint32 words by
:func:`jret.kernels.pack_bits` (bit ``i`` of word ``j`` is code bit ``32 j + i``; the layout shared
with ASMK★). :func:`hamming_knn` ranks by the popcount of XOR with the chunked top-k of
:mod:`jret.search`, returning ``(scores, ids)`` like :func:`jret.search.knn` with
``scores = −Hamming distance``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from jret import search
from jret._checks import check_ndim, check_nonempty, check_positive_int, check_same_dim
from jret.kernels import hamming_distance, pack_bits
from jret.whitening import _as_fit_data, pca_whiten_learn

ITQ_ITERS = 50
KMH_BITS = 4
KMH_LAMBDA = 10.0
DEFAULT_CHUNK_SIZE = 16384


# ------------------------------------------------------------------------------------------------
# Fitting helpers


def _check_bits(X: np.ndarray, nbits: int) -> int:
    nbits = check_positive_int(nbits, "nbits")
    if nbits > X.shape[1]:
        raise ValueError(f"nbits: expected at most the input dimension {X.shape[1]}, got {nbits}")
    return nbits


def _check_iters(iters: int, name: str = "iters") -> int:
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {iters!r}")
    return int(iters)


def _pca(X: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and the ``dims`` leading principal directions ``(dims, D)`` of ``X``."""
    pca = pca_whiten_learn(X, shrinkage=0.0, dims=dims)
    return np.asarray(pca.m, np.float64), np.asarray(pca.P, np.float64)


def _adam(loss: Callable, params, steps: int, learning_rate: float):
    """``steps`` Optax-Adam steps on ``loss(params)`` from a fresh optimiser state; jit-able."""
    opt = optax.adam(learning_rate)

    def step(_, carry):
        p, state = carry
        updates, state = opt.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    return lax.fori_loop(0, steps, step, (params, opt.init(params)))[0]


@partial(jax.jit, static_argnums=1)
def random_orthogonal(key: jax.Array, n: int) -> jax.Array:
    """A random ``(n, n)`` orthogonal matrix: Q of the QR of a Gaussian matrix, signs fixed by R."""
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
    return q * jnp.sign(jnp.where(jnp.diag(r) == 0, 1.0, jnp.diag(r)))


# ------------------------------------------------------------------------------------------------
# ITQ and the random-rotation baselines


@flax.struct.dataclass
class LinearHash:
    """A linear hash ``bits = (x − m) @ W ≥ 0``: ``m (D,)``, ``W (D, L)`` (PCA × rotation)."""

    m: jax.Array
    W: jax.Array

    @property
    def nbits(self) -> int:
        return self.W.shape[1]


def itq_rotation(V: jax.Array, R0: jax.Array, iters: int = ITQ_ITERS) -> jax.Array:
    """ITQ iterations from ``R0 (L, L)`` on PCA-projected data ``V (n, L)``: ``iters`` times
    ``B = sign(VR)``, ``U Σ Ŵᵀ = svd(VᵀB)``, ``R = U Ŵᵀ``. Returns ``R (L, L)``; jit-able."""
    check_ndim(V, "V", (2,), "projected data (n, L)")
    check_ndim(R0, "R0", (2,), "a rotation (L, L)")

    def step(_, R):
        B = jnp.where(V @ R >= 0, 1.0, -1.0).astype(V.dtype)
        U, _, Wt = jnp.linalg.svd(V.T @ B)
        return U @ Wt

    return lax.fori_loop(0, iters, step, R0)


_itq_rotation_jit = jax.jit(itq_rotation, static_argnums=2)


def itq_learn(key: jax.Array, X: jax.Array, nbits: int, iters: int = ITQ_ITERS) -> LinearHash:
    """Fit ITQ with ``nbits`` bits on training vectors ``X (n, D)``, ``nbits <= D``.

    Args:
      key: draws the initial random rotation.
      X: training vectors (the learning set's aggregated descriptors, never the test set).
      nbits: code length ``L``.
      iters: ITQ iterations (default 50, SPEC §14.1 #48); 0 keeps the random rotation.

    The PCA runs on the host in float64 (:func:`jret.whitening.pca_whiten_learn`), the
    iterations in float32.
    """
    X = _as_fit_data(X)
    nbits = _check_bits(X, nbits)
    iters = _check_iters(iters)
    m, E = _pca(X, nbits)
    V = jnp.asarray((X - m) @ E.T, jnp.float32)
    R = _itq_rotation_jit(V, random_orthogonal(key, nbits), iters)
    return LinearHash(m=jnp.asarray(m, jnp.float32), W=jnp.asarray(E.T, jnp.float32) @ R)


def random_rotation_learn(key: jax.Array, X: jax.Array, nbits: int, pca: bool = True) -> LinearHash:
    """Sign codes of randomly rotated, centred data: the baselines ITQ is measured against.

    ``pca=True`` (default): PCA to ``nbits`` dims followed by a random rotation, ITQ's PCA-RR
    baseline (ITQ with no iteration). ``pca=False``: the first ``nbits`` axes of a random rotation
    of the full space (a random orthonormal projection, LSH-like), no PCA.
    """
    if pca:
        return itq_learn(key, X, nbits, iters=0)
    X = _as_fit_data(X)
    nbits = _check_bits(X, nbits)
    W = random_orthogonal(key, X.shape[1])[:, :nbits]
    return LinearHash(m=jnp.asarray(X.mean(0), jnp.float32), W=W)


# ------------------------------------------------------------------------------------------------
# K-means hashing


@flax.struct.dataclass
class KMeansHash:
    """KMH: mean ``m (D,)``, per-subspace projections ``P (S, D, d_s)`` and codewords
    ``codewords (S, 2^b, d_s)``; a vector's code concatenates the ``b``-bit indices of its nearest
    codeword in every subspace."""

    m: jax.Array
    P: jax.Array
    codewords: jax.Array

    @property
    def bits_per_subspace(self) -> int:
        return int(self.codewords.shape[1]).bit_length() - 1

    @property
    def nbits(self) -> int:
        return self.codewords.shape[0] * self.bits_per_subspace


def index_hamming_root(b: int) -> jax.Array:
    """``√h(i, j)`` ``(2^b, 2^b)`` between the ``b``-bit indices of ``2^b`` codewords."""
    i = np.arange(2**b)
    return jnp.sqrt(jnp.asarray(np.bitwise_count(i[:, None] ^ i[None, :]), jnp.float32))


def _pairwise(c: jax.Array) -> jax.Array:
    """Distances ``‖c_i − c_j‖`` ``(K, K)`` with a gradient-safe square root."""
    d2 = jnp.sum((c[:, None] - c[None]) ** 2, axis=-1)
    off = ~jnp.eye(c.shape[0], dtype=bool)
    return jnp.where(off, jnp.sqrt(jnp.where(off, d2, 1.0)), 0.0)


def kmh_energy(
    codewords: jax.Array, means: jax.Array, weights: jax.Array, lam: float, hroot: jax.Array
) -> jax.Array:
    """KMH objective of one subspace with assignments fixed, up to a constant:
    ``Σ_i w_i ‖c_i − x̄_i‖² + λ Σ_{i,j} w_i w_j (‖c_i − c_j‖ − s √h_ij)²``, ``s`` at its optimum
    ``Σ w_i w_j d_ij √h_ij / Σ w_i w_j h_ij`` (held fixed in the gradient)."""
    quan = jnp.sum(weights * jnp.sum((codewords - means) ** 2, axis=-1))
    d = _pairwise(codewords)
    w2 = weights[:, None] * weights[None, :]
    s = jnp.sum(w2 * d * hroot) / jnp.maximum(jnp.sum(w2 * hroot**2), 1e-12)
    return quan + lam * jnp.sum(w2 * (d - lax.stop_gradient(s) * hroot) ** 2)


def _assign(Z: jax.Array, codewords: jax.Array) -> jax.Array:
    """Nearest codeword per subspace: ``Z (S, n, d_s)``, ``codewords (S, K, d_s)`` → ``(S, n)``."""
    d2 = (
        jnp.sum(codewords**2, -1)[:, None, :]
        - 2 * jnp.einsum("snd,skd->snk", Z, codewords)
        + jnp.sum(Z**2, -1)[..., None]
    )
    return jnp.argmin(d2, axis=-1)


@partial(jax.jit, static_argnames=("iters", "steps", "learning_rate"))
def _kmh_fit(Z, C0, lam, iters, steps, learning_rate):
    K = C0.shape[1]
    hroot = index_hamming_root(K.bit_length() - 1)
    energy = jax.vmap(kmh_energy, (0, 0, 0, None, None))

    def outer(_, C):
        onehot = jax.nn.one_hot(_assign(Z, C), K, dtype=Z.dtype)
        counts = onehot.sum(1)
        means = jnp.einsum("snk,snd->skd", onehot, Z) / jnp.maximum(counts, 1.0)[..., None]
        w = counts / Z.shape[1]
        return _adam(lambda c: jnp.sum(energy(c, means, w, lam, hroot)), C, steps, learning_rate)

    return lax.fori_loop(0, iters, outer, C0)


def kmh_learn(
    X: jax.Array,
    nbits: int,
    bits_per_subspace: int = KMH_BITS,
    lam: float = KMH_LAMBDA,
    iters: int = 20,
    steps: int = 20,
    learning_rate: float = 1e-2,
) -> KMeansHash:
    """Fit K-means hashing with ``nbits`` bits on ``X (n, D)`` (deterministic initialisation).

    Args:
      X: training vectors ``(n, D)``.
      nbits: code length ``<= D``, a multiple of ``bits_per_subspace``; ``S = nbits / b``
        subspaces of ``d_s = ⌊D/S⌋ >= b`` PCA dimensions.
      bits_per_subspace: ``b`` (default 4, 16 codewords per subspace).
      lam: weight λ of the affinity error (default 10).
      iters: assignment / update alternations (default 20).
      steps: Adam steps per update (default 20) with ``learning_rate`` (1e-2).
    """
    X = _as_fit_data(X)
    nbits = _check_bits(X, nbits)
    b = check_positive_int(bits_per_subspace, "bits_per_subspace")
    if nbits % b:
        raise ValueError(f"nbits: expected a multiple of bits_per_subspace = {b}, got {nbits}")
    S = nbits // b
    ds = X.shape[1] // S  # >= b since nbits <= D
    m, E = _pca(X, S * ds)
    groups = np.arange(S * ds).reshape(ds, S).T
    Pm = np.stack([E[g].T for g in groups])
    Z = np.einsum("nd,sdk->snk", X - m, Pm)
    corners = (np.arange(2**b)[:, None] >> np.arange(b)) & 1
    C0 = np.zeros((S, 2**b, ds))
    C0[:, :, :b] = (2.0 * corners - 1.0)[None] * Z[:, :, :b].std(1)[:, None, :]
    C0 += Z.mean(1, keepdims=True)
    C = _kmh_fit(
        jnp.asarray(Z, jnp.float32),
        jnp.asarray(C0, jnp.float32),
        float(lam),
        _check_iters(iters),
        _check_iters(steps, "steps"),
        float(learning_rate),
    )
    return KMeansHash(m=jnp.asarray(m, jnp.float32), P=jnp.asarray(Pm, jnp.float32), codewords=C)


# ------------------------------------------------------------------------------------------------
# Relaxed binary autoencoder


@flax.struct.dataclass
class RBA:
    """Relaxed binary autoencoder: encoder ``(x − m) W + b`` (its sign is the code) and decoder
    ``D (D_in, L)``, ``c (D_in,)`` kept for reconstruction."""

    m: jax.Array
    W: jax.Array
    b: jax.Array
    D: jax.Array
    c: jax.Array

    @property
    def nbits(self) -> int:
        return self.W.shape[1]


class RBAParams(NamedTuple):
    """The trainable part of :class:`RBA`: encoder ``W, b`` and decoder ``D, c``."""

    W: jax.Array
    b: jax.Array
    D: jax.Array
    c: jax.Array


def rba_loss(p: RBAParams, X: jax.Array, B: jax.Array, mu: float, decay: float) -> jax.Array:
    """``(‖X − (B Dᵀ + c)‖² + µ‖XW + b − B‖²)/2n + decay(‖W‖² + ‖D‖²)/2`` (X centred)."""
    n = X.shape[0]
    rec = jnp.sum((X - B @ p.D.T - p.c) ** 2)
    pen = jnp.sum((X @ p.W + p.b - B) ** 2)
    return (rec + mu * pen) / (2 * n) + decay * (jnp.sum(p.W**2) + jnp.sum(p.D**2)) / 2


def rba_codes_step(p: RBAParams, X: jax.Array, mu: float) -> jax.Array:
    """Auxiliary codes ``B = sign((DᵀD + µI)⁻¹(Dᵀ(x − c) + µh))`` ``(n, L)`` in ``{−1, +1}``."""
    L = p.W.shape[1]
    A = p.D.T @ p.D + mu * jnp.eye(L, dtype=X.dtype)
    rhs = (X - p.c) @ p.D + mu * (X @ p.W + p.b)
    return jnp.where(jnp.linalg.solve(A, rhs.T).T >= 0, 1.0, -1.0).astype(X.dtype)


@partial(jax.jit, static_argnames=("iters", "steps", "learning_rate"))
def _rba_fit(X, p0, mu, decay, iters, steps, learning_rate):
    def outer(_, p):
        B = rba_codes_step(p, X, mu)
        return _adam(lambda q: rba_loss(q, X, B, mu, decay), p, steps, learning_rate)

    return lax.fori_loop(0, iters, outer, p0)


def rba_learn(
    key: jax.Array,
    X: jax.Array,
    nbits: int,
    mu: float = 1.0,
    decay: float = 1e-4,
    iters: int = 10,
    steps: int = 20,
    learning_rate: float = 1e-2,
) -> RBA:
    """Fit the relaxed binary autoencoder with ``nbits`` bits on ``X (n, D)`` (Optax Adam).

    Initialised from ITQ (encoder = ITQ projection scaled to unit-variance outputs, decoder = its
    least-squares reconstruction), then ``iters`` alternations of the ``B`` step and ``steps``
    Adam steps (``learning_rate``) on :func:`rba_loss` with penalty ``mu`` (1.0) and weight decay
    ``decay`` (1e-4).
    """
    Xn = _as_fit_data(X)
    nbits = _check_bits(Xn, nbits)
    itq = itq_learn(key, Xn, nbits)
    m = np.asarray(itq.m, np.float64)
    Xc = Xn - m
    W = np.asarray(itq.W, np.float64)
    W = W / np.maximum((Xc @ W).std(0), 1e-12)
    B = np.where(Xc @ W >= 0, 1.0, -1.0)
    D = np.linalg.lstsq(B, Xc, rcond=None)[0].T
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    p0 = RBAParams(W=f32(W), b=f32(np.zeros(nbits)), D=f32(D), c=f32(np.zeros(Xn.shape[1])))
    p = _rba_fit(
        f32(Xc),
        p0,
        float(mu),
        float(decay),
        _check_iters(iters),
        _check_iters(steps, "steps"),
        float(learning_rate),
    )
    return RBA(m=f32(m), W=p.W, b=p.b, D=p.D, c=p.c)


# ------------------------------------------------------------------------------------------------
# Encoding


Hasher = LinearHash | KMeansHash | RBA


def hash_bits(X: jax.Array, hasher: Hasher) -> jax.Array:
    """Binary codes ``(N, L)`` bool of vectors ``X (N, D)`` under a fitted hasher; jit-able.

    Linear hashes and RBA give ``projection ≥ 0`` (sign(0) → +1); KMH gives the ``b`` bits of each
    subspace's nearest-codeword index, least significant first.
    """
    check_ndim(X, "X", (2,), "vectors (N, D)")
    if not jnp.issubdtype(jnp.result_type(X), jnp.floating):
        raise ValueError(f"X: expected a floating dtype, got {jnp.result_type(X)}")
    if X.shape[1] != hasher.m.shape[0]:
        raise ValueError(f"X: expected dimension {hasher.m.shape[0]}, got {X.shape}")
    Xc = X - hasher.m
    if isinstance(hasher, LinearHash):
        return Xc @ hasher.W >= 0
    if isinstance(hasher, RBA):
        return Xc @ hasher.W + hasher.b >= 0
    if isinstance(hasher, KMeansHash):
        idx = _assign(jnp.einsum("nd,sdk->snk", Xc, hasher.P), hasher.codewords)
        bits = (idx.T[..., None] >> jnp.arange(hasher.bits_per_subspace)) & 1
        return bits.reshape(X.shape[0], -1).astype(bool)
    raise ValueError(f"hasher: expected LinearHash, KMeansHash or RBA, got {type(hasher).__name__}")


@jax.jit
def encode(X: jax.Array, hasher: Hasher) -> jax.Array:
    """Packed codes ``(N, ⌈L/32⌉)`` uint32 of ``X (N, D)``: ``pack_bits(hash_bits(X, hasher))``
    (jitted)."""
    return pack_bits(hash_bits(X, hasher))


# ------------------------------------------------------------------------------------------------
# Hamming search


def _neg_hamming(queries: jax.Array, rows: jax.Array) -> jax.Array:
    """``−Hamming distance`` ``(nq, c)`` float32 between packed codes (popcount of XOR)."""
    return (-hamming_distance(queries[:, None, :], rows[None, :, :])).astype(jnp.float32)


def _check_codes(queries, database, k: int, validate: bool) -> None:
    """Packed ``(n, W)`` uint32 codes of equal width, ``1 <= k <= n``; emptiness on ``validate``."""
    for name, codes in (("queries", queries), ("database", database)):
        check_ndim(codes, name, (2,), f"{name} (n, words) packed uint32 codes")
        if jnp.result_type(codes) != jnp.uint32:
            raise ValueError(f"{name}: expected packed uint32 codes, got {jnp.result_type(codes)}")
        if validate:
            check_nonempty(codes, name)
    check_same_dim(queries, database, "queries", "database")
    check_positive_int(k, "k")
    if k > database.shape[0]:
        raise ValueError(f"k: expected at most n = {database.shape[0]} (database rows), got {k}")


def hamming_knn_chunked(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact Hamming top-k, the jit-able core of :func:`hamming_knn` (shape checks only).

    Returns ``scores (nq, k)`` float32 ``= −Hamming distance``, decreasing, and ``ids (nq, k)``
    int32; equal distances keep the lower database index first.
    """
    _check_codes(queries, database, k, validate=False)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if query_chunk_size is not None:
        check_positive_int(query_chunk_size, "query_chunk_size")
    return search._query_blocks(
        lambda q: search._knn_local(q, database, k, chunk_size, score_fn=_neg_hamming),
        queries,
        query_chunk_size,
    )


@partial(jax.jit, static_argnames=("k", "chunk_size", "query_chunk_size"))
def _hamming_jit(queries, database, k, chunk_size, query_chunk_size):
    return hamming_knn_chunked(queries, database, k, chunk_size, query_chunk_size)


def hamming_knn(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int | None = None,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Exact k-nearest neighbours in Hamming distance of packed codes (popcount of XOR).

    Args:
      queries: ``(nq, W)`` uint32 packed codes (:func:`encode`).
      database: ``(n, W)`` uint32 packed codes with the same ``W``.
      k: number of neighbours, ``1 <= k <= n``.
      chunk_size: database rows per chunk (default 16384); memory ``O(nq × chunk_size)``.
      query_chunk_size: optional number of query rows processed at a time.
      validate: check for empty inputs first (default True).

    Returns ``(scores, ids)`` as :func:`jret.search.knn`: ``scores (nq, k)`` float32
    ``= −Hamming distance`` sorted decreasing, ``ids (nq, k)`` int32, ties by the lower id.
    """
    _check_codes(queries, database, k, validate)
    return _hamming_jit(queries, database, k, chunk_size, query_chunk_size)


def hamming_knn_sharded(
    queries: jax.Array,
    database: jax.Array,
    k: int,
    mesh: Mesh,
    axis_name: str = "db",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    validate: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """:func:`hamming_knn` with the database rows sharded over the mesh axis ``axis_name``.

    Each shard searches its rows (zero-padded to a multiple of the shard count; padded rows never
    appear), the per-shard candidates are all-gathered in shard order and merged by a stable
    top-k, so the result, ties included, equals :func:`hamming_knn`'s.
    """
    _check_codes(queries, database, k, validate)
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    return search._knn_sharded_jit(
        queries, database, k, mesh, axis_name, chunk_size, score_fn=_neg_hamming
    )
