"""A supervised server (`spmd.launch --serve`): the HTTP side runs in the supervisor, outside the MPI job, so that a
client's connection and its stream outlive a job that loses a rank. Both ends of the protocol live here.

The supervisor's `Front` runs spmd.api's server (bound before the first job starts: /health answers 503 until a job
has loaded). Each request goes to the job's rank 0 as a line on the requests pipe; its tokens come back in the
journal (spmd.journal), each with the text that goes to the client for it. When a job fails, the requests not yet
ended are sent to the relaunched job with the tokens they had and their sampler's state: it re-prefills them and
goes on, and each client's stream goes on after its last piece, neither repeated nor cut. Requests that come during
the relaunch wait for it.

In the job, rank 0's `Feed` reads the pipe on a thread and puts each request in the driver's inbox, with a `JobSink`
that hands the sequence's text to the journal.

Lines on the requests pipe (JSON, one a line):
  {"ev": "work", "seq": I, "ids": [...], "steps": N, "temperature": T, "top_k": K, "top_p": P, "seed": S,
   "resume": null or {"tokens": [...], "rng": STATE, "finish": null}}
  {"ev": "cancel", "seq": I}      the client went away, or a stop string matched: no more of it
  {"ev": "status", "id": K}       answered in the journal: {"ev": "status", "id": K, "status": {...} or null}
Events of a serving job's journal beyond spmd.journal's: "ready" also gives "model", "tokenizer", "context",
"n_known" and "slots" (the gateway's facts); "token"'s "out" is the sequence's own text.
"""
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .prompts import PromptSpec, Work

MAX_LINE_BYTES = 16 * 2**20  # a work line holds at most a context of token ids


@dataclass
class Request:
    """A request sent to a job and not ended: its work, its sink, the tokens sampled so far and the sampler's state
    after them (what a relaunched job goes on from)."""
    work: Work
    sink: object
    tokens: list = field(default_factory=list)
    rng: dict = None


class Front:
    """The supervisor's side. `lines(ready)` -> what to send the job now; `apply(event)` takes a journal event;
    `lost()` when a job has ended; `close()` at the end."""

    def __init__(self, host, port, model_id, queue_limit, cors, log, recovers=True):
        from .api import Inbox, Server, address, listen_error
        self.log, self.model_id, self.host, self.recovers = log, model_id, host, recovers
        self.wake, self._wake_w = os.pipe()  # the supervisor's select wakes as a request comes
        for fd in (self.wake, self._wake_w):
            os.set_blocking(fd, False)
        self.inbox = Inbox(on_wake=self._wake)
        self.server = Server(host, port, model_id, queue_limit, cors)
        try:
            self.server.start()
        except OSError as e:
            self._close_pipe()
            raise UserError(f"cannot listen on {address(host, port)}: {listen_error(e)}") from None
        self.requests = {}  # index -> Request: sent to a job and not ended
        self.waiting = []  # (work, sink) taken from the inbox while no job was ready
        self.asks, self._asks = {}, iter(range(1, 2**62))  # status id -> reply
        self.recoveries = []  # the supervisor's, shown in /cluster
        self.resend = False  # a job has just loaded: the requests in flight go to it
        self.served, self.tokens, self.since = 0, 0, None  # requests and tokens in all jobs; when the first loaded

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # it is awake already
            pass

    @property
    def busy(self):
        """Requests a job is answering (its progress is watched only then: an idle server makes no tokens)."""
        return bool(self.requests)

    def ready(self, event, n_ranks):
        """A job has loaded: the first opens the server's gateway; a relaunched one takes the requests in flight."""
        if self.server.gateway is None:
            self.server.open(self._gateway(event))
            self.since = time.monotonic()
            from .api import serving_line
            loss = "is recovered from" if self.recovers else "ends it (--no-recover)"
            self.log(serving_line(self.model_id, self.host, self.server.port, n_ranks, event["slots"],
                                  event["context"], f"; supervised: a lost rank {loss}"))
        self.resend = True

    def _gateway(self, event):
        from .api import Gateway
        from .chat_template import load_template
        from .gguf_file import GGUFFile
        from .tokenizer import load_tokenizer
        file = GGUFFile(event["model"])
        tokenizer = load_tokenizer(file, event["tokenizer"])
        return Gateway(self.inbox, tokenizer, load_template(file, tokenizer, self.log), event["context"],
                       event["n_known"], event["slots"])

    def lines(self, ready):
        """The lines for the job now (bytes): requests in flight again after a relaunch, new ones, cancellations and
        status asks. While no job is ready, requests wait and status asks are answered None (503)."""
        try:
            while os.read(self.wake, 4096):
                pass
        except BlockingIOError:
            pass
        work, asks = self.inbox.take(0)
        self.waiting += work
        out = []
        if ready and self.resend:
            self.resend = False
            for _, r in sorted(self.requests.items()):
                out.append(_work_line(r.work, {"tokens": r.tokens, "rng": r.rng, "finish": None}))
        for index, request in list(self.requests.items()):
            if request.sink.cancelled:
                del self.requests[index]
                out.append({"ev": "cancel", "seq": index})
        for reply in asks:
            if not ready:
                reply(None)
                continue
            key = next(self._asks)
            self.asks[key] = reply
            out.append({"ev": "status", "id": key})
        if ready:
            for w, sink in self.waiting:
                if not sink.cancelled:
                    self.served += 1
                    self.requests[w.index] = Request(w, sink)
                    out.append(_work_line(w, None))
            self.waiting = []
        return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in out)

    def apply(self, event):
        """A journal event of the serving job: a token (its text to the client) or a status answer."""
        ev = event["ev"]
        if ev == "token":
            r = self.requests.get(event["seq"])
            if r is None:  # cancelled meanwhile
                return
            if event["token"] is not None:
                r.tokens.append(event["token"])
                self.tokens += 1
            r.rng = event["rng"]
            if event["out"]:
                r.sink.piece(event["out"], len(r.tokens))
            if event["end"] is not None:
                r.sink.done(event["end"], len(r.tokens))
                del self.requests[event["seq"]]
        elif ev == "status":
            reply = self.asks.pop(event["id"], None)
            if reply is not None:
                status = event["status"]
                if status is not None:  # the counts of every job (the job's own start again at a relaunch)
                    server = {**status.get("server", {}), "requests": self.served, "tokens_generated": self.tokens}
                    status = {**status, "server": server, "recoveries": self.recoveries}
                reply(status)

    def lost(self):
        """The job has ended: its status asks will not be answered."""
        for reply in self.asks.values():
            reply(None)
        self.asks = {}

    def close(self):
        """The end: every request not answered ends "stopped" (its client is told), and the server stops."""
        self.inbox.close()
        work, asks = self.inbox.take(0)
        for reply in asks:
            reply(None)
        self.lost()
        for r in self.requests.values():
            r.sink.done("stopped", len(r.tokens))
        for _, sink in self.waiting + work:
            sink.done("stopped", 0)
        self.requests, self.waiting = {}, []
        self.server.stop()
        self._close_pipe()
        if self.since is not None:
            from .supervise import recoveries_text
            self.log(f"[spmd] served {self.served} request{'s' * (self.served != 1)}, {self.tokens} tokens in "
                     f"{time.monotonic() - self.since:.1f} s"
                     + (f"; {recoveries_text(self.recoveries)}" if self.recoveries else ""))

    def _close_pipe(self):
        os.close(self.wake)
        os.close(self._wake_w)


def _work_line(w, resume):
    spec = w.spec
    return {"ev": "work", "seq": w.index, "ids": w.ids.tolist(), "steps": w.steps, "temperature": spec.temperature,
            "top_k": spec.top_k, "top_p": spec.top_p, "seed": spec.seed, "resume": resume}


class JobSink:
    """In the job: a served sequence's text goes into the journal with its token (spmd.journal's `Journal.token`
    sends what was emitted since the last token); a cancelled sequence's last piece goes nowhere, its client has
    gone."""

    def __init__(self, feed, index):
        self.feed, self.index, self.cancelled = feed, index, False

    def piece(self, text, _n_tokens):
        if not self.cancelled:
            self.feed.journal.emit(text)

    def done(self, _finish, _n_tokens):  # the journal's token event says how it ended
        self.feed.sinks.pop(self.index, None)


class Feed:
    """In the job, rank 0: reads the supervisor's requests pipe on a thread into the driver's inbox. Its end (the
    supervisor gone) closes the inbox: the job stops as on Ctrl-C."""

    def __init__(self, path, inbox, journal):
        if journal is None:
            raise UserError("--requests goes with --journal (spmd.supervise gives both)")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # the supervisor holds it open for writing
        except OSError as e:
            raise UserError(f"--requests {path}: {e.strerror} (it is spmd.front's pipe)") from None
        os.set_blocking(fd, True)
        self.file, self.inbox, self.journal = os.fdopen(fd, "rb"), inbox, journal
        self.sinks = {}  # index -> JobSink of the sequences not ended

    def start(self):
        threading.Thread(target=self._read, name="spmd-feed", daemon=True).start()

    def _read(self):
        with self.file:
            while line := self.file.readline(MAX_LINE_BYTES):
                try:
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError) as e:  # not the supervisor's: say so, go on
                    print(f"note: a request line from the supervisor was not understood ({e!r:.100})",
                          file=sys.stderr, flush=True)
        self.inbox.close()

    def _apply(self, line):
        ev = line["ev"]
        if ev == "work":
            index, ids = line["seq"], [int(i) for i in line["ids"]]
            spec = PromptSpec(ids=tuple(ids), steps=line["steps"], temperature=line["temperature"],
                              top_k=line["top_k"], top_p=line["top_p"], seed=line["seed"], where="the request")
            sink = self.sinks[index] = JobSink(self, index)
            self.inbox.put(Work(index, np.array(ids, np.int64), line["steps"], spec, line["resume"]), sink)
        elif ev == "cancel":
            sink = self.sinks.pop(line["seq"], None)
            if sink is not None:
                sink.cancelled = True
        elif ev == "status":
            key = line["id"]
            self.inbox.ask_status(lambda status: self.journal.event("status", id=key, status=status))
        else:
            raise ValueError(f"unknown event {ev!r}")
