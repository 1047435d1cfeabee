"""Choosing the next token from the full logits, on rank 0 only."""
import numpy as np


class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus), from a seeded generator."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits) -> int:
        """logits (vocab,) float32 -> token id"""
        if self.temperature <= 0.0:
            return int(np.argmax(logits))
        with np.errstate(over="ignore"):  # <= 0: a tiny temperature gives -inf, not NaN
            z = (logits.astype(np.float64) - logits.max()) / self.temperature
        candidates = np.argsort(-z, kind="stable")  # best first
        if 0 < self.top_k < len(candidates):
            candidates = candidates[:self.top_k]
        p = np.exp(z[candidates] - z[candidates[0]])
        p /= p.sum()
        if self.top_p < 1.0:  # the smallest prefix whose mass reaches top_p
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1
            candidates, p = candidates[:keep], p[:keep] / p[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=p)])
