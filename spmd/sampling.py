"""Choosing the next token on rank 0, from the logits of the whole vocabulary or from the candidates the last
stage's ranks sent: greedy needs each rank's best, top-k each rank's k best, anything else every logit."""
import numpy as np

MOST_TOP_K = 2**31 - 1  # a step record carries each sequence's top-k in 64 bits: 2^63 did not fit


class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus), from a seeded generator."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.top_k = min(int(top_k), MOST_TOP_K)  # (any larger keeps as many: every vocabulary is smaller)
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
        `candidates` best of each slice). The same token as from all the logits, however they were split: ties go
        to the lower id, and every token's probability is laid out in id order (top-k: best first) for the draw."""
        if self.temperature <= 0.0:
            return int(ids[values == values.max()].min())
        z = values.astype(np.float64)
        z -= z.max()  # (the largest: 0)
        with np.errstate(over="ignore"):  # <= 0: a tiny temperature gives -inf, not NaN
            z /= self.temperature
        by_id = self.top_k == 0  # (whatever the candidates' number: the order must not depend on the layout)
        if not by_id:  # the top_k best (few: each slice's best), best first, ties by id
            order = np.lexsort((ids, -z))[:self.top_k]
        elif np.all(ids[1:] > ids[:-1]):  # every token, in id order (as every layout gathers them)
            order = None
        else:
            order = np.argsort(ids, kind="stable")
        p = np.exp(z if order is None else z[order])
        if self.top_p < 1.0:
            order, p = self._nucleus(np.arange(len(p)) if order is None else order, p, ids, by_id)
        cdf = np.cumsum(p)  # one uniform draw, as Generator.choice makes (without its checks of p: 0.3 ms)
        at = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(p) - 1)
        return int(ids[at if order is None else order[at]])

    def _nucleus(self, order, p, ids, by_id):
        """The smallest prefix of the candidates `order` (weights p; in id order where by_id), best first and ties
        by id, whose mass reaches top_p of theirs: sought among the 64, 512 and 4096 largest before sorting them
        all (sorting the whole vocabulary took 1-2.5 ms a token)."""
        total, m = p.sum(), 64
        while True:
            if m < len(p):  # those above the m-th largest weight (ties there would have to be ordered by id)
                head = np.flatnonzero(p > np.partition(p, len(p) - m)[len(p) - m])
            else:
                head = np.arange(len(p))
            # (head ascends: in id order, a stable sort by weight leaves ties by id)
            head = head[np.argsort(-p[head], kind="stable") if by_id else np.lexsort((ids[order[head]], -p[head]))]
            mass = np.cumsum(p[head]) / total
            if m >= len(p) or (len(head) and mass[-1] >= self.top_p):
                keep = min(int(np.searchsorted(mass, self.top_p)) + 1, len(head))
                return order[head[:keep]], p[head[:keep]]
            m *= 8
