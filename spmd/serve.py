"""`python -m spmd.serve`: the cluster as an OpenAI-compatible server. Every rank runs it, as spmd.run; rank 0
serves HTTP (spmd.api) while every rank runs the model (the driver takes the requests as they come, up to
--sequences at once). Ctrl-C or SIGTERM (mpirun passes it to every rank) stops it cleanly: the answers under way
end, every rank exits with status 0, the control socket file is removed."""
from . import needs  # (first: one line, not a traceback, where this Python lacks the set-up)
import os
import re
import signal
import sys
import threading

import click

from .errors import nonempty
from .run import (cluster_options, flags_agreed, guarded, imports_agreed, interrupt, model_or_embedded, parse_args,
                  root_log, stdout_to_rank_0, supervised, term_is_loss, watched)

STOP_GRACE_S = 20.0  # a rank told to stop waits this long for rank 0's STOP before it takes the job down
ASK_AFTER_S = 0.5  # and asks rank 0 to stop after this long (where mpirun passed the signal on to every rank, rank 0
# is stopping already: the ask changes nothing)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--host", default="127.0.0.1", show_default=True, callback=lambda _c, _p, v: listen_host(v),
              help="Address to listen on (0.0.0.0: every interface of rank 0's host).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: any free one; the address is printed).")
@click.option("--ctx-size", "-c", "context", default=0, type=click.IntRange(min=0), metavar="N",
              help="Positions a sequence may take, prompt and answer. Default (or 0): the model's context, at most "
                   "4096.")
@click.option("--sequences", default=4, show_default=True, type=click.IntRange(min=1), metavar="K",
              help="Requests generated at once; the others wait in order.")
@click.option("--queue", "queue_limit", default=32, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Requests that may wait for a free sequence; more are answered 429 with Retry-After.")
@click.option("--alias", default=None, metavar="NAME", callback=nonempty,
              help="The model's id in the API. Default: the file's name.")
@click.option("--cors", default=None, metavar="ORIGIN[,ORIGIN...]", callback=lambda _c, _p, v: cors_origins(v),
              help="Let pages of these origins (http://host:port, or * for any) call the API from a browser. "
                   "Default: none (the page at / needs none).")
@click.option("--journal", default=None, hidden=True, help="spmd.supervise's pipe (spmd.journal).")
@click.option("--requests", default=None, hidden=True,
              help="spmd.front's pipe: the requests come from the supervisor, which serves HTTP.")
@click.option("--resume", default=None, hidden=True, help="spmd.supervise's resume file: its layout.")
@cluster_options
def cli(**kw):
    """Serve a GGUF model split across MPI ranks as an OpenAI-compatible API, with a chat and a page at /.

    Run it on every rank: mpirun -n 3 python -m spmd.serve --model m.gguf --ratios 2:3:3 --port 8080
    """
    return kw


def listen_host(text):
    """--host as given; click's BadParameter where it is empty (an unset shell variable: which would listen on every
    interface)."""
    if not text.strip():
        raise click.BadParameter("give an address or host name (127.0.0.1: this machine only; 0.0.0.0: every "
                                 "interface)")
    return text


def cors_origins(text):
    """--cors -> a tuple of origins ("*", or scheme://host[:port] each); click's BadParameter where one is not."""
    if text is None:
        return ()
    origins = tuple(o.strip().rstrip("/") for o in text.split(","))
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?", origin):
            raise click.BadParameter(f"{origin!r} is not an origin (http://HOST[:PORT], https://..., or *)")
    return origins


def main(argv=None):
    needs.interruptible()
    try:
        watched()
        run(argv)
    except KeyboardInterrupt:  # before the engine started (importing, parsing): nothing to clean up
        sys.exit(130)


def run(argv):
    from . import comm as C  # initialises MPI
    comm = C.Comm()
    stdout_to_rank_0(comm)
    prog = "python -m spmd.serve"
    kw = flags_agreed(comm, parse_args(argv, comm.is_root, cli, prog), prog)
    imports_agreed(comm, ("engine", "api", "chat_template", "front"))
    from .api import Gateway, Inbox, Server, address, listen_error, serving_line
    from .chat_template import load_template
    from .control import default_path
    from .engine import Engine, RunOptions
    from .front import Feed
    from .rank import agree
    log = root_log(comm)
    note = model_or_embedded(kw)
    host, port, queue_limit, cors = kw.pop("host"), kw.pop("port"), kw.pop("queue_limit"), kw.pop("cors")
    model_id = kw.pop("alias") or os.path.basename(kw["model"])
    requests = kw.pop("requests")  # supervised (spmd.front): the supervisor serves HTTP
    journal = supervised(comm, log, kw.pop("journal"))
    inbox = Inbox() if comm.is_root else None
    feed = guarded(comm, log, lambda: agree(comm, lambda: Feed(requests, inbox, journal) if comm.is_root
                                            and requests is not None else None))
    server, failed = None, None
    if comm.is_root and feed is None:
        server = Server(host, port, model_id, queue_limit, cors)
        try:
            server.start()  # /health answers 503 while the model loads
        except OSError as e:
            failed = f"cannot listen on {address(host, port)}: {listen_error(e)}"
    failed = comm.first_error(failed)
    if failed is not None:
        log(f"error: {failed}")
        sys.exit(1)
    root_pid = comm.bcast(os.getpid())
    socket_path = kw.pop("control_socket") or default_path(root_pid)
    opts = RunOptions(**kw, control_socket=None if socket_path.lower() == "none" else socket_path)
    try:
        engine = guarded(comm, log, lambda: Engine(opts, comm, log=log, journal=journal))
        if note:
            log(note)
        state = engine.state
        if feed is not None:
            journal.event("ready", ratios=state.plan.text(), prompts=[], model=os.path.abspath(opts.model),
                          tokenizer=opts.tokenizer and os.path.abspath(opts.tokenizer), context=state.context,
                          n_known=state.n_known, slots=state.n_slots)
            feed.start()
        elif server is not None:
            server.open(Gateway(inbox, state.tokenizer, load_template(state.file, state.tokenizer, log),
                                state.context, state.n_known, state.n_slots))
            log(serving_line(model_id, host, server.port, comm.size, state.n_slots, state.context))
        stop_on_signals(comm, inbox)
        result = guarded(comm, log, lambda: engine.run(inbox=inbox))
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the job is over and its status known: a
            # signal now (mpirun passing on the Ctrl-C that stopped it, late on a loaded machine) changes nothing.
            # Python's exit would restore the default action before MPI's finalisation, and a rank killed there
            # made mpirun exit 2 after a clean stop
            signal.signal(signum, signal.SIG_IGN)
    finally:
        if server is not None:
            server.stop()
    if comm.is_root and feed is None:  # supervised, the supervisor says it for every job
        log(f"[spmd] served {result['requests']} request{'s' * (result['requests'] != 1)}, "
            f"{result['tokens_generated']} tokens in "
            f"{result['elapsed_s']:.1f} s; {result['n_ranks']} rank(s) {result['ratios']}, {result['backend']}")


def stop_on_signals(comm, inbox):
    """From now on, Ctrl-C or SIGTERM stops the server cleanly: on rank 0 the inbox closes (the driver ends what is
    in flight and sends STOP); another rank asks rank 0 to stop too (where the signal reached it alone), waits for
    that STOP, and takes the job down only if it does not come within STOP_GRACE_S. A second signal on rank 0 stops
    at once (its second own: a signal that reaches rank 0 after another rank's ask has closed the inbox is its
    first, as mpirun's passing it on may come late on a loaded machine)."""
    def later(seconds, action):
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()

    seen = []  # the signals rank 0 got itself (the inbox may have closed without one: another rank's ask)

    def on_signal(signum, frame):
        if comm.is_root:
            seen.append(signum)
            if len(seen) > 1:
                interrupt(signum, frame)
            inbox.close()
        else:
            later(ASK_AFTER_S, lambda: comm.ask_root_to_stop(signum, wait_s=1.0))
            later(STOP_GRACE_S, lambda: comm.abort(128 + signum))
    if comm.is_root:
        comm.on_stop_asked = lambda _signum: inbox.close()  # (not a second signal: that would stop at once)
    signal.signal(signal.SIGINT, on_signal)
    if not term_is_loss():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)


if __name__ == "__main__":
    main()
