"""A supervised job's journal: what rank 0 tells its supervisor (spmd.supervise) as it goes, one JSON object a line
on a pipe; and the resume file a relaunched job starts from. Both ends of the protocol live here.

Events, in the order rank 0 writes them:
  {"ev": "ranks", "ranks": [[host, pid], ...]}   each rank's host and process, as the job starts
  {"ev": "ready", "ratios": LAYOUT, "prompts": [[ids], ...], "at": T}   set up and loaded, at T (time.time();
                                    spmd.serve's has none: the supervisor's clock as it reads the line)
  {"ev": "prefill", "seqs": [[I, N], ...]}   a step that runs the prompts of sequences I, N tokens each, goes out
                                    (the supervisor allows for its time until each has its first token)
  {"ev": "token", "seq": I, "token": T, "end": FINISH, "rng": STATE, "out": TEXT, "figures": FIGURES,
   "since": SINCE}
        sequence I sampled T (null: EOS, which ended it); END is null or why it ended ("eos", "length",
        "stopped"); RNG the sampler's generator state after it (null when greedy); OUT the text stdout gets with it;
        FIGURES, where it ended spmd.run's sequence, its timings for the result (spmd.driver.FIGURES), else null;
        SINCE, with its first token where that did not end it, {"admitted": T, "first": T} (time.time()), else null
  {"ev": "plan", "ratios": LAYOUT}  a migration applied
  {"ev": "done", "text": TEXT}      --output text: generation has ended; TEXT is the rest of stdout (the last
                                    piece, the end of line): a job that fails after this has nothing more to say
  {"ev": "result", "result": {...}} --output json, instead of "done": the run's result
Each line is written whole by one write; a job killed in the middle of one leaves a line without its newline, which
the reader drops: what was not journaled did not happen, so the text a supervisor prints is never doubled or cut.

The resume file (written by the supervisor, read by rank 0 of the relaunched job):
  {"version": 1, "ratios": LAYOUT, "sequences": [{"seq": I, "prompt": [ids], "tokens": [...], "finish": FINISH,
   "rng": STATE, "figures": FIGURES, "since": SINCE}, ...], "ranks": [...], "began": T}
T is when the first job was ready (time.time(), on rank 0's machine, the supervisor's): the relaunch's elapsed time
and rate count from it, the failures' waits and the relaunches' loads included; a sequence that had begun (SINCE)
keeps its admission and first token's times, so its decode rate counts the wait for the relaunch too.
LAYOUT is null where the run was planned (--plan): the relaunch plans again, on a saved profile's ranks that
"ranks" names (the survivors' indices in the profile, in their new order; absent for --plan auto, which measures
again).
"""
import json
import os
import time

from .errors import UserError, regular_file

VERSION = 1
MAX_RESUME_BYTES = 256 * 2**20
FINISHES = (None, "eos", "length", "stopped")
FIGURES = ("queued_ms", "prefill_ms", "decode_tokens_per_s", "ms_per_token")  # a sequence's timings in a result


class Journal:
    """Rank 0's end: the pipe the supervisor reads. `emit` is the run's stdout (spmd.run's write_stdout): its text
    rides with the next token, or goes out on `flush`."""

    def __init__(self, path):
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # the supervisor holds it open: never waits
        except OSError as e:
            raise UserError(f"--journal {path}: {e.strerror} (it is spmd.supervise's pipe)") from None
        os.set_blocking(self.fd, True)
        self.pending, self.gone = [], False

    def emit(self, piece):
        self.pending.append(piece)
        return not self.gone

    def token(self, seq, token, figures=None, since=None):
        self._write(ev="token", seq=seq.index, token=token, end=seq.finish, rng=seq.sampler.state, out=self.take(),
                    figures=figures, since=since)

    def event(self, ev, **fields):
        self._write(ev=ev, **fields)

    def take(self):
        """The stdout text not yet journaled."""
        text, self.pending = "".join(self.pending), []
        return text

    def _write(self, **event):
        if self.gone:
            return
        view = memoryview((json.dumps(event, separators=(",", ":")) + "\n").encode())
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:  # the supervisor has gone: nobody reads any more (the run stops, as with | head)
            self.gone = True


class Record:
    """The supervisor's end: what the job has journaled, kept across relaunches. `apply(event)` takes one line's
    event and returns the stdout text it carries ("" for none). Serving (spmd.front), the requests' tokens are
    the front's: the record only counts them."""

    def __init__(self, serving=False):
        self.serving = serving
        self.ranks, self.ready = [], False  # [(host, pid)] of the job now running; whether it has loaded
        self.started = False  # whether any job has loaded (a failure before that is not recovered from)
        self.ratios = None  # its layout now
        self.prompts = None  # [[ids]] by sequence index
        self.sequences = {}  # index -> {"tokens": [...], "finish": ..., "rng": ..., "figures": ..., "since": ...}
        self.done, self.result = False, None
        self.prefills = {}  # sequence index -> the prompt tokens of its prefill, sent and not yet answered by a token
        self.tokens = 0  # token events in all
        self.began = None  # when the first job was ready (time.time())

    def apply(self, e):
        ev = e["ev"]
        if ev == "ranks":
            self.ranks = [tuple(r) for r in e["ranks"]]
        elif ev == "ready":
            self.ratios, self.prompts, self.ready, self.started = e["ratios"], e["prompts"], True, True
            self.began = self.began or e.get("at") or time.time()
        elif ev == "prefill":
            self.prefills.update((i, n) for i, n in e["seqs"])
        elif ev == "token":
            self.prefills.pop(e["seq"], None)
            self.tokens += 1
            if self.serving:
                return ""
            seq = self.sequences.setdefault(e["seq"], {"tokens": [], "finish": None, "rng": None})
            if e["token"] is not None:
                seq["tokens"].append(e["token"])
            seq["finish"], seq["rng"], seq["figures"] = e["end"], e["rng"], e.get("figures")
            seq["since"] = None if e["end"] else e.get("since") or seq.get("since")  # (an ended one has figures)
            return e["out"]
        elif ev == "plan":
            self.ratios = e["ratios"]
        elif ev == "done":
            self.done = True
            return e["text"]
        elif ev == "result":  # (--output json's end: the run is as complete as with "done")
            self.result, self.done = e["result"], True
        return ""

    @property
    def prefill(self):
        """Prompt tokens sent whose sequences have not had a token since."""
        return sum(self.prefills.values())

    @property
    def unfinished_tokens(self):
        """Tokens a relaunch replays: those of the sequences not yet ended."""
        return sum(len(s["tokens"]) for s in self.sequences.values() if s["finish"] is None)

    def relaunch(self):
        """A new job starts: what it has not said yet is unknown."""
        self.ranks, self.ready, self.prefills = [], False, {}

    def resume(self, ratios, ranks=None):
        """The resume file's contents for a relaunch on `ratios` (None: planned again, on the profile's `ranks`)."""
        return {"version": VERSION, "ratios": ratios, "ranks": ranks, "began": self.began,
                "sequences": [{"seq": i, "prompt": self.prompts[i], **s} for i, s in sorted(self.sequences.items())]}


def read_resume(path):
    """Rank 0 of a relaunched job: the resume file, checked. {"ratios": LAYOUT or None, "ranks": [...] or None,
    "sequences": {index: entry}}."""
    regular_file(path, "--resume")
    with open(path, "rb") as f:
        data = f.read(MAX_RESUME_BYTES + 1)
    bad = UserError(f"--resume {path}: not a resume file of this version of spmd (spmd.supervise writes it)")
    try:
        obj = json.loads(data) if len(data) <= MAX_RESUME_BYTES else None
    except (ValueError, RecursionError):  # (RecursionError: nested too deeply)
        raise bad from None
    if not (isinstance(obj, dict) and obj.get("version") == VERSION and isinstance(obj.get("ratios"), (str, type(None)))
            and isinstance(obj.get("sequences"), list) and (obj.get("ranks") is None or _ints(obj["ranks"]))
            and (obj.get("began") is None or _number(obj["began"]))):
        raise bad
    sequences = {}
    for s in obj["sequences"]:
        figures = s.get("figures") if isinstance(s, dict) else None
        if not (isinstance(s, dict) and _ints(s.get("prompt")) and _ints(s.get("tokens"))
                and isinstance(s.get("seq"), int) and s.get("finish") in FINISHES
                and (s.get("rng") is None or isinstance(s["rng"], dict))
                and (figures is None or (isinstance(figures, dict) and set(figures) == set(FIGURES)
                                         and all(v is None or _number(v) for v in figures.values())))
                and _since(s, obj.get("began"))):
            raise bad
        sequences[s["seq"]] = s
    return {"ratios": obj["ratios"], "ranks": obj.get("ranks"), "sequences": sequences, "began": obj.get("began")}


def _since(entry, began):
    """Whether a resume entry's "since" is none, or times that can be: an unfinished sequence that sampled a token,
    admitted after the first job began, its first token after that, both before now."""
    v = entry.get("since")
    if v is None:
        return True
    return (isinstance(v, dict) and set(v) == {"admitted", "first"} and all(map(_number, v.values()))
            and entry["tokens"] and entry["finish"] is None
            and (began or 0) <= v["admitted"] <= v["first"] <= time.time())


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e12


def _ints(v):
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
