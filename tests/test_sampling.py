"""Sampling on rank 0: greedy, temperature, top-k, top-p, and a seed that makes it repeatable."""
import numpy as np

from spmd.sampling import Sampler

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def frequencies(sampler, n=4000):
    return np.bincount([sampler(LOGITS) for _ in range(n)], minlength=4) / n


def test_greedy_is_argmax():
    assert Sampler(0.0)(np.array([0.1, 3.0, 2.9], np.float32)) == 1


def test_temperature_one_follows_the_distribution():
    np.testing.assert_allclose(frequencies(Sampler(1.0, seed=0)), [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_k_keeps_the_k_best():
    f = frequencies(Sampler(1.0, top_k=2, seed=0))
    assert f[2] == f[3] == 0
    np.testing.assert_allclose(f[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    f = frequencies(Sampler(1.0, top_p=0.7, seed=0))  # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    assert f[2] == f[3] == 0 and f[1] > 0.3


def test_top_p_0_keeps_the_most_probable_token_alone():
    f = frequencies(Sampler(1.0, top_p=0.0, seed=0))
    assert f[0] == 1.0


def test_low_temperature_sharpens():
    assert frequencies(Sampler(0.1, seed=0))[0] > 0.95


def test_seed_repeats_and_differs():
    s1, s2, s3 = Sampler(1.0, seed=3), Sampler(1.0, seed=3), Sampler(1.0, seed=4)
    run = [[s(LOGITS) for _ in range(50)] for s in (s1, s2, s3)]
    assert run[0] == run[1] != run[2]


def test_a_tiny_temperature_is_greedy_not_nan():
    assert Sampler(1e-320, seed=0)(LOGITS) == 0


def test_the_k_best_are_found_without_sorting_the_row():
    """spmd.comm.top (a rank's top-k candidates) gives np.argsort(-row, kind="stable")[:k]: the same ids in the
    same order, ties by the lower id, with infinities and NaN."""
    from spmd.comm import top
    rng = np.random.default_rng(1)
    for trial in range(2000):
        n = int(rng.integers(1, 300))
        row = rng.integers(-4, 4, n).astype(np.float32) if trial % 2 else rng.standard_normal(n).astype(np.float32)
        for bad, every in ((-np.inf, 7), (np.inf, 11), (np.nan, 13)):
            if trial % every == 0:
                row[rng.integers(0, n)] = bad
        k = int(rng.integers(1, n + 2))
        assert np.array_equal(top(row, k), np.argsort(-row, kind="stable")[:k])


def nucleus_reference(z, top_p):
    """The ids of the smallest best-first (ties by id) prefix of exp(z) reaching top_p of the mass: a full sort."""
    order = np.lexsort((np.arange(len(z)), -z))
    p = np.exp(z[order])
    return order[:int(np.searchsorted(np.cumsum(p) / p.sum(), top_p)) + 1]


def test_the_nucleus_is_the_smallest_prefix_however_far_it_reaches():
    """top-p's prefix, sought among the few largest weights first, is the full sort's, from a peaked distribution
    (a few tokens) to a flat one (most of 20000), with ties."""
    rng = np.random.default_rng(2)
    for scale, top_p in ((8.0, 0.9), (3.0, 0.95), (0.5, 0.99), (0.01, 0.999), (0.0, 0.5)):
        z = np.round(rng.standard_normal(20000) * scale, 1)  # (rounded: ties)
        z -= z.max()
        s = Sampler(1.0, top_p=top_p)
        order, p = s._nucleus(np.arange(len(z)), np.exp(z), np.arange(len(z)), True)
        assert np.array_equal(order, nucleus_reference(z, top_p))


def test_every_token_sampled_as_its_probability_says():
    """Temperature alone, and with top-p, over a vocabulary of 3000: token frequencies follow the renormalised
    probabilities (computed here with a full sort)."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(3000) * 4).astype(np.float32)
    for top_p in (1.0, 0.8):
        z = (logits.astype(np.float64) - logits.max()) / 0.7
        keep = nucleus_reference(z, top_p)
        expected = np.zeros(len(z))
        expected[keep] = np.exp(z[keep]) / np.exp(z[keep]).sum()
        s = Sampler(0.7, top_p=top_p, seed=5)
        counts = np.bincount([s(logits) for _ in range(6000)], minlength=len(z)) / 6000
        assert counts[expected == 0].sum() == 0
        likely = expected > 0.02
        np.testing.assert_allclose(counts[likely], expected[likely], atol=0.02)


def test_the_token_does_not_depend_on_how_the_candidates_came():
    """The same draws from every logit in id order or shuffled, and from top-k candidates whole or as two ranks'
    slices' own best (spmd.comm.best), give the same tokens."""
    from spmd.comm import best
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(5000) * 2).astype(np.float32)
    shuffle = rng.permutation(len(logits))
    for k, p in ((0, 1.0), (0, 0.9), (40, 1.0), (40, 0.8)):
        whole, parts = Sampler(0.8, k, p, seed=9), Sampler(0.8, k, p, seed=9)
        for _ in range(50):
            if k == 0:
                a = whole.pick(logits, np.arange(len(logits)))
                b = parts.pick(logits[shuffle], shuffle)
            else:
                a = whole.pick(*best(logits[None], (k,), 0))
                v1, i1 = best(logits[None, :2000], (k,), 0)
                v2, i2 = best(logits[None, 2000:], (k,), 2000)
                b = parts.pick(np.concatenate([v1, v2]), np.concatenate([i1, i2]))
            assert a == b
