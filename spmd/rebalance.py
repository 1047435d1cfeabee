"""`--rebalance`: keep the split balanced while it runs. Pure (no MPI): rank 0's driver feeds it every rank's
recent figures (what the control socket's `status` reports) and carries out what it decides as a live migration.

Each rank's measured compute per decode batch is held against what the profile predicts for its share at those
rows (`planner.rank_compute_ms`): the ratio is the rank's correction factor (a rank running 3x slower than profiled
gets 3), smoothed over looks. In a stage of several ranks, the one that waits least in the allreduces spends that
time communicating: what its allreduces take beyond the links' latency and bandwidth corrects the profile's
`allreduce_ms` (a network stack slower than the ping-pong showed). With the profile corrected by these
(`planner.scaled`) the planner is asked again; a new layout is taken when it is predicted at least THRESHOLD
faster than the current one (both predicted with the corrected profile) and the time it saves over the tokens
still to come outweighs the move's cost. A rank must have run MIN_STEPS decode batches under the current plan
before its figure counts; a layout left is not proposed again for the next COOLDOWN looks.

Predictions can be wrong (a loaded machine, a model that misses a cost), so the tokens/s each layout actually gave
is kept too: when the current layout runs THRESHOLD slower than one measured before, the rebalancer goes back to
that one, and a layout measured slower than the current one is not proposed. So a move the model got wrong costs
one look, not the rest of the run; and each such miss doubles the gain the next proposal must promise, so a
model that keeps missing (a cost it cannot represent) stops moving instead of oscillating. A proposal counts once
it is carried out (`taken`: a socket migration may come first); one that could not be (`refused`: a host short of
memory) is not proposed again for COOLDOWN looks. Every move made is kept (`decisions`) for the log and the
result.
"""
from dataclasses import dataclass, replace

from . import planner
from .cluster import as_profile

THRESHOLD = 0.10  # the least predicted gain that is worth a move
MIN_STEPS = 8  # decode batches a rank must have run under the current plan before a look
SMOOTHING = 0.5  # weight of a new measurement in a rank's factor
COOLDOWN = 4  # looks before a layout left may be taken again
MOVE_FIXED_MS = 50.0  # the estimated cost of a migration: a fixed part, and the bytes that change hands
MOVE_BYTES_PER_MS = 1e6  # (read from the file or sent: about 1 GB/s)


@dataclass(frozen=True)
class Decision:
    """A move the rebalancer made: when, from and to which layout, what it predicted, the factors it saw."""
    at: int  # tokens generated when it was decided
    before: str
    after: str
    predicted_ms_before: float  # per token, with the corrected profile
    predicted_ms_after: float
    factors: tuple  # each rank's measured / profiled compute
    measured: dict  # tokens/s each layout gave so far (the latest look at it)
    why: str  # "predicted": the planner's proposal; "measured": back to a layout that ran faster

    def line(self) -> str:
        factors = ", ".join(f"{f:.2f}" for f in self.factors)
        if self.why == "measured":
            return (f"rebalance at token {self.at}: --ratios '{self.before}' -> '{self.after}' (back: measured "
                    f"{self.measured[self.before]:.1f} against {self.measured[self.after]:.1f} tokens/s)")
        return (f"rebalance at token {self.at}: --ratios '{self.before}' -> '{self.after}' (predicted "
                f"{self.predicted_ms_before:.2f} -> {self.predicted_ms_after:.2f} ms per token; compute measured / "
                f"profiled per rank: {factors})")


class Rebalancer:
    def __init__(self, profile, objective, sequences, context, allreduce):
        self.profile = as_profile(profile)
        self.objective, self.sequences, self.context, self.allreduce = objective, sequences, context, allreduce
        self.factors = [1.0] * len(self.profile.ranks)
        self.allreduce_ms = self.profile.allreduce_ms  # an allreduce's own cost, corrected by what stages measure
        self.looks = 0  # `consider` calls so far
        self.left = {}  # layout text -> the look it was left at
        self.measured = {}  # layout text -> tokens/s it gave at its latest look
        self.misses = 0  # proposals that measured slower than the layout they left (each doubles the threshold)
        self.decisions = []
        self.proposed = None  # the Decision of `consider`'s last proposal, until `taken`

    def observe(self, plan, ranks, rate=None) -> bool:
        """Take every rank's recent figures (compute_ms, rows, steps per rank, under `plan`) and the tokens/s
        measured since the last look (or move); False while some working rank has not run MIN_STEPS decode
        batches under it."""
        if any(r["steps"] < MIN_STEPS for r in ranks if r["stage"] is not None):
            return False
        if rate:
            self.measured[plan.text()] = rate
        for r in ranks:
            if r["stage"] is None:
                continue  # an idle rank keeps the factor it had when it last worked
            predicted = planner.rank_compute_ms(self.profile, plan, max(1, round(r["rows"])))[r["rank"]]
            if predicted and predicted > 0:
                f = SMOOTHING * r["compute_ms"] / predicted + (1 - SMOOTHING) * self.factors[r["rank"]]
                self.factors[r["rank"]] = max(f, 1e-3)
        self._observe_allreduces(plan, ranks)
        return True

    def _observe_allreduces(self, plan, ranks):
        """An allreduce's own cost, from the stages of several ranks: the rank that waits least in a stage's
        allreduces (its slowest) spends that time communicating, two allreduces a layer; what that takes beyond
        the links' latency and bandwidth corrects the profile's `allreduce_ms` (smoothed)."""
        links_only = replace(self.profile, allreduce_ms=0.0)
        for st in plan.stages:
            if len(st.ranks) < 2:
                continue
            mine = [ranks[r] for r in st.ranks]
            rows = max(1, round(mine[0]["rows"]))
            per = min(r["allreduce_ms"] for r in mine) / (2 * st.n_layers)
            links = planner.allreduce_ms(links_only, st.ranks, rows, self.allreduce)
            self.allreduce_ms = SMOOTHING * max(0.0, per - links) + (1 - SMOOTHING) * self.allreduce_ms

    def consider(self, plan, tokens_left, at):
        """A better layout's text, or None: predicted THRESHOLD faster, worth the move over the `tokens_left`
        tokens still to generate, and not one left in the last COOLDOWN looks (going back to a layout that measured
        faster is not held back)."""
        current = plan.text()
        self.proposed = None
        prof = replace(planner.scaled(self.profile, self.factors), allreduce_ms=self.allreduce_ms)
        k = self.sequences if self.objective == "throughput" else 1
        now = planner.predict(prof, current, k, self.context, self.allreduce)
        self.looks += 1
        fastest = max(self.measured, key=self.measured.get, default=current)
        if current in self.measured and self.measured[current] < self.measured[fastest] * (1 - THRESHOLD):
            back = planner.predict(prof, fastest, k, self.context, self.allreduce)
            return self._decide(at, current, fastest, now, back, "measured")
        best = planner.plan(prof, self.objective, self.sequences, self.context, allreduce=self.allreduce)
        if best.text == current or self.looks - self.left.get(best.text, -COOLDOWN - 1) <= COOLDOWN:
            return None
        if self.measured.get(best.text, 0) and self.measured[best.text] <= self.measured.get(current, 0):
            return None  # tried, and it ran no faster
        if best.ms_per_token > now.ms_per_token * (1 - min(0.9, THRESHOLD * 2 ** self.misses)):
            return None
        saved_ms = tokens_left * (1000 / now.tokens_per_s - 1000 / best.tokens_per_s)
        if saved_ms < self.move_ms(plan, best.text):
            return None
        return self._decide(at, current, best.text, now, best, "predicted")

    def _decide(self, at, current, text, now, then, why):
        self.proposed = Decision(at, current, text, now.ms_per_token, then.ms_per_token,
                                 tuple(round(f, 3) for f in self.factors),
                                 {t: round(r, 3) for t, r in self.measured.items()}, why)
        return text

    def refused(self) -> Decision:
        """The last proposal could not be carried out (a host short of memory, say): its layout is not proposed
        again for COOLDOWN looks."""
        d, self.proposed = self.proposed, None
        self.left[d.after] = self.looks
        return d

    def taken(self) -> Decision:
        """The last proposal has been carried out: it counts (the layout left, a miss where it goes back, the
        record)."""
        d, self.proposed = self.proposed, None
        self.left[d.before] = self.looks
        self.misses += d.why == "measured"
        self.decisions.append(d)
        return d

    def move_ms(self, plan, text) -> float:
        """The estimated cost of moving from `plan` to the layout `text`: the weights of the units that change
        hands, and a fixed part."""
        from .plan import parse_layout
        from .replan import diff, relayout
        m = self.profile.model
        new = relayout(plan, parse_layout(text, len(plan)))  # as the driver carries it out
        per_unit = {"kv": m.kv_group_bytes, "ffn": m.ffn_block_bytes, "vocab": m.vocab_row_bytes}
        moved = sum(per_unit[unit] for unit, *_ in diff(plan, new))
        return MOVE_FIXED_MS + moved / MOVE_BYTES_PER_MS
