"""Choosing the next token on rank 0, from the logits of the whole vocabulary or from the candidates the last
stage's ranks sent: greedy needs each rank's best, top-k each rank's k best, anything else every logit."""
import numpy as np


class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus), from a seeded generator."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.rng = np.random.default_rng(seed)

    @property
    def candidates(self) -> int:
        """How many of the best logits of each rank's slice it needs: 1 (greedy), top_k, or 0 (all of them)."""
        return 1 if self.temperature <= 0.0 else self.top_k

    @property
    def state(self):
        """The generator's state (a JSON-able dict) where sampling draws from it; None when greedy."""
        return self.rng.bit_generator.state if self.temperature > 0.0 else None

    def restore(self, state):
        """Continue from a `state` taken earlier (a relaunched job replaying a sequence: spmd.supervise)."""
        if state is not None:
            self.rng.bit_generator.state = state

    def __call__(self, logits) -> int:
        """logits (vocab,) float32 -> token id"""
        return self.pick(logits, np.arange(len(logits)))

    def pick(self, values, ids) -> int:
        """A token id from candidates: their logits `values` and token `ids` (every token's, or at least the
        `candidates` best of each slice). The same token as from all the logits: ties go to the lower id."""
        if self.temperature <= 0.0:
            return int(ids[values == values.max()].min())
        with np.errstate(over="ignore"):  # <= 0: a tiny temperature gives -inf, not NaN
            z = (values.astype(np.float64) - values.max()) / self.temperature
        order = np.lexsort((ids, -z))  # best first, ties by id: a stable sort of the whole vocabulary
        if 0 < self.top_k < len(order):
            order = order[:self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1.0:  # the smallest prefix whose mass reaches top_p
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(ids[order[self.rng.choice(len(order), p=p)]])
