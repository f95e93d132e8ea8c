"""jret.hqe against a direct transcription of the HQE steps, and its effect on a constructed case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jret import hqe, kernels, qe
from jret.kernels import WordSet

RNG = np.random.default_rng(0)
NBITS = 64


def flip(bits, n):
    out = bits.copy()
    out[RNG.choice(len(bits), n, replace=False)] ^= True
    return out


def make_set(words, bits, size):
    """A padded WordSet from word ids and bool codes ``(len, NBITS)``."""
    w = np.full(size, -1, np.int32)
    b = np.zeros((size, NBITS), bool)
    w[: len(words)] = words
    b[: len(words)] = bits
    return WordSet(
        words=jnp.asarray(w), data=kernels.pack_bits(jnp.asarray(b)), mask=jnp.asarray(w >= 0)
    )


def stack(sets):
    return jax.tree.map(lambda *a: jnp.stack(a), *sets)


def random_sets(n, size, n_words=30):
    sets, raw = [], []
    for _ in range(n):
        m = int(RNG.integers(size // 2, size))
        words = RNG.integers(0, n_words, m)
        bits = RNG.random((m, NBITS)) < 0.5
        sets.append(make_set(words, bits, size))
        raw.append((words, bits))
    return sets, raw


def test_correspondences_match_brute_force():
    (q,), ((qw, qb),) = random_sets(1, 40)
    sets, raw = random_sets(6, 30)
    got = np.asarray(hqe.correspondences(q, stack(sets), strict=28))
    ref = [
        sum(
            int(a == b and np.sum(x != y) <= 28)
            for a, x in zip(qw, qb, strict=True)
            for b, y in zip(w, bits, strict=True)
        )
        for w, bits in raw
    ]
    np.testing.assert_array_equal(got, ref)


def np_select(query_words, images, reliable, alpha):
    """The walk of step 4: words by the number of reliable images containing them."""
    vq = set(query_words)
    counts = {}
    for (words, _), ok in zip(images, reliable, strict=True):
        if ok:
            for w in set(words):
                counts[w] = counts.get(w, 0) + 1
    order = sorted(counts, key=lambda w: (-counts[w], w))
    n_aug, aug, chosen = int(np.floor(alpha * len(vq))), 0, set()
    for w in order:
        if aug >= n_aug:
            break
        chosen.add(w)
        aug += w not in vq
    return sorted(chosen)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_select_words_matches_the_walk(alpha):
    (q,), ((qw, _),) = random_sets(1, 20, n_words=40)
    sets, raw = random_sets(8, 30, n_words=40)
    reliable = np.array([True, False, True, True, False, True, True, False])
    words, ok = hqe.select_words(q, stack(sets), jnp.asarray(reliable), alpha)
    got = np.asarray(words)[np.asarray(ok)].tolist()
    assert got == np_select(qw, raw, reliable, alpha)


def test_expansion_is_the_majority_of_reliable_codes():
    (q,), ((qw, qb),) = random_sets(1, 24, n_words=20)
    sets, raw = random_sets(5, 24, n_words=20)
    res = hqe.hqe(
        jax.random.key(0), q, stack(sets), system="smk", strict=NBITS, min_correspondences=1
    )
    reliable = np.asarray(res.reliable)
    chosen = set(np_select(qw, raw, reliable, 0.5))
    votes = {}
    for w, b in zip(qw, qb, strict=True):
        votes.setdefault(int(w), []).append(b)
    for (words, bits), ok in zip(raw, reliable, strict=True):
        for w, b in zip(words, bits, strict=True):
            if ok and w in chosen:
                votes.setdefault(int(w), []).append(b)
    exp = res.expanded
    got_words = np.asarray(exp.words)[np.asarray(exp.mask)]
    assert got_words.tolist() == sorted(votes)
    assert exp.words.shape == (24 + 12,)
    got_bits = np.asarray(kernels.unpack_bits(exp.data, NBITS))[np.asarray(exp.mask)]
    for w, b in zip(got_words, got_bits, strict=True):
        s = np.sum(np.where(np.array(votes[w]), 1, -1), axis=0)
        np.testing.assert_array_equal(b[s != 0], s[s != 0] > 0)
    # ties are broken from the key: same key, same codes; jit gives the same result
    jitted = jax.jit(
        lambda k, q, d: hqe.hqe(k, q, d, system="smk", strict=NBITS, min_correspondences=1)
    )
    again = jitted(jax.random.key(0), q, stack(sets))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(res), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hqe_retrieves_images_that_share_no_word_with_the_query():
    base = RNG.random((60, NBITS)) < 0.5  # an object: 60 words with their codes
    query = make_set(np.arange(30), np.stack([flip(base[w], 2) for w in range(30)]), 64)
    easy = [
        make_set(np.arange(45), np.stack([flip(base[w], 3) for w in range(45)]), 64)
        for _ in range(5)
    ]
    hard = [
        make_set(np.arange(30, 60), np.stack([flip(base[w], 3) for w in range(30, 60)]), 64)
        for _ in range(5)
    ]
    clutter = []
    for _ in range(30):
        words = np.concatenate([RNG.integers(0, 60, 5), RNG.integers(60, 200, 40)])
        clutter.append(make_set(words, RNG.random((45, NBITS)) < 0.5, 64))
    db = stack(easy + hard + clutter)
    search = jax.jit(
        lambda k, q, d: hqe.hqe_search(k, q, d, system="smk", nbits=NBITS, shortlist=20)
    )
    initial, final, res = search(jax.random.key(1), query, db)
    initial, final = np.asarray(initial), np.asarray(final)
    assert np.all(initial[5:10] == 0) and np.all(final[5:10] > 0)
    order = np.argsort(-final, kind="stable")
    assert set(order[:10]) == set(range(10))
    assert int(np.asarray(res.reliable).sum()) == 5


def test_he_system_defaults():
    assert qe.hqe is hqe.hqe  # the name, jret.qe.hqe
    assert hqe._strict("he", None, 64) == 16
    assert hqe._strict("asmk", None, 128) == 32  # τ = 0.5 ↔ h ≤ B/4
    assert hqe._strict("smk", 10, 128) == 10


def test_bad_input():
    (q,), _ = random_sets(1, 8)
    sets, _ = random_sets(2, 8)
    db = stack(sets)
    with pytest.raises(ValueError, match="system"):
        hqe.hqe(jax.random.key(0), q, db, system="bow")
    with pytest.raises(ValueError, match="uint32"):
        hqe.hqe(jax.random.key(0), q.replace(data=q.data.astype(jnp.float32)), db)
    with pytest.raises(ValueError, match="widths differ"):
        hqe.hqe(jax.random.key(0), q.replace(data=q.data[:, :1]), db)
    with pytest.raises(ValueError, match=r"\(S, Q\)"):
        hqe.hqe(jax.random.key(0), q, q)
    with pytest.raises(ValueError, match="min_correspondences"):
        hqe.hqe(jax.random.key(0), q, db, min_correspondences=0)
