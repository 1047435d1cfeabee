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


def test_low_temperature_sharpens():
    assert frequencies(Sampler(0.1, seed=0))[0] > 0.95


def test_seed_repeats_and_differs():
    s1, s2, s3 = Sampler(1.0, seed=3), Sampler(1.0, seed=3), Sampler(1.0, seed=4)
    run = [[s(LOGITS) for _ in range(50)] for s in (s1, s2, s3)]
    assert run[0] == run[1] != run[2]


def test_a_tiny_temperature_is_greedy_not_nan():
    assert Sampler(1e-320, seed=0)(LOGITS) == 0
