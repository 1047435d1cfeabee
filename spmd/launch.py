"""`python -m spmd.launch`: check a hostfile and its hosts, then start the job through mpirun.

    python -m spmd.launch --hostfile hostfiles/home.txt -n 3 -- --model model.gguf --ratios 2:3:3

A hostfile in the wrong format, a host that does not resolve, or one whose ssh port does not answer gives one
line naming the host and the line, before any process starts; ssh is then told to give up after a few seconds
rather than hang. Everything after `--` goes to `python -m spmd.run` (with --serve, `python -m spmd.serve`).

A run is supervised (spmd.supervise): a rank that dies, a host that goes away or a job that stops making progress
is recovered from by a relaunch on the survivors, which goes on from the last token; --no-recover ends the run
instead, with one line naming the rank and host. So is a server (--serve): its HTTP side runs in the supervisor
(spmd.front), and each client's stream goes on through a recovery."""
from . import needs  # noqa: F401 (first: one line, not a traceback, where this Python lacks the set-up)
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import click

from .errors import UserError, click_main, is_whole_number, nonempty, regular_file
from .run import finite

MAX_HOSTFILE_BYTES = 1 << 20
LOCAL = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}


def parse_hostfile(path):
    """MPICH format -> [(line number, host, slots)]; raises click.ClickException naming the bad line."""
    try:
        regular_file(path, "hostfile")
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read(MAX_HOSTFILE_BYTES + 1).splitlines()
        if sum(len(line) + 1 for line in lines) > MAX_HOSTFILE_BYTES:
            raise click.ClickException(f"hostfile {path} is larger than {MAX_HOSTFILE_BYTES >> 10} KiB")
    except UserError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot read hostfile {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"hostfile {path} is not text") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        host, _, slots = text.partition(":")
        if ("#" in text or " " in text or not host or (slots and not is_whole_number(slots)) or slots == "0"
                or len(slots) > 6):
            openmpi = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", text)  # Open MPI's form
            hint = f": write {openmpi[1]}:{openmpi[2]}" if openmpi else ""
            raise click.ClickException(
                f"{path} line {number}: {text!r} is not HOST or HOST:SLOTS (MPICH format, SLOTS 1-999999; comments "
                f"go on their own lines){hint}")
        hosts.append((number, host, int(slots or 1)))
    if not hosts:
        raise click.ClickException(f"{path} names no hosts")
    return hosts


def check_reachable(path, hosts, timeout):
    for number, host, _ in hosts:
        if host in LOCAL:
            continue
        try:
            addr = socket.getaddrinfo(host, 22, type=socket.SOCK_STREAM)[0][4]
        except (socket.gaierror, UnicodeError):  # UnicodeError: an empty or over-long label ("a..b")
            raise click.ClickException(f"{path} line {number}: host {host!r} does not resolve") from None
        try:
            socket.create_connection(addr[:2], timeout=timeout).close()
        except OSError as e:
            reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
            raise click.ClickException(
                f"{path} line {number}: host {host} is unreachable on ssh port 22 ({reason})") from None
        check_ssh(path, number, host, timeout)


def check_ssh(path, number, host, timeout):
    """mpirun starts a remote host's ranks by ssh (or HYDRA_LAUNCHER_EXEC, which takes ssh's arguments), which must
    log in without a password or a question: try it as mpirun will (BatchMode), and say in one line why it fails."""
    try:
        ssh = os.environ.get("HYDRA_LAUNCHER_EXEC") or "ssh"
        p = subprocess.run([ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}", host, "true"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                           timeout=timeout + 5)
    except FileNotFoundError:
        raise click.ClickException(f"{path} line {number}: host {host}: ssh is not installed here (mpirun starts "
                                   "the ranks of other hosts through it)") from None
    except subprocess.TimeoutExpired:
        raise click.ClickException(f"{path} line {number}: host {host}: ssh did not log in within "
                                   f"{timeout + 5:g} s") from None
    if p.returncode != 0:
        said = [line.strip() for line in p.stderr.splitlines() if line.strip()]
        why = said[-1][:200] if said else f"status {p.returncode}"
        if re.search(r"permission denied|host key|identification has changed|authentication", p.stderr, re.I):
            raise click.ClickException(f"{path} line {number}: host {host}: ssh cannot log in without a password "
                                       f"({why}): set up a key (ssh-copy-id {host}) and accept its host key once")
        if re.search(r"timed out|refused|no route|could not resolve|unreachable|closed by|reset by", p.stderr, re.I):
            raise click.ClickException(f"{path} line {number}: host {host}: ssh could not reach it ({why}): is its "
                                       "ssh server running, and the host up?")
        raise click.ClickException(f"{path} line {number}: host {host}: ssh failed ({why}); mpirun starts the "
                                   "host's ranks through it")


MOST_RANKS = 1024  # beyond any household; a mistyped count would start that many processes here


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hostfile", "-f", default=None, type=click.Path(dir_okay=False), callback=nonempty,
              help="MPICH hostfile; rank 0 runs on its first host, which must be this machine for the run to be "
                   "supervised. Default: every rank here.")
@click.option("-n", "ranks", type=click.IntRange(min=1, max=MOST_RANKS), default=None,
              help="Number of ranks (default: the slots in the hostfile).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(1, 300), callback=finite,
              help="Seconds to wait for each host.")
@click.option("--serve", is_flag=True,
              help="Run python -m spmd.serve (the server) instead of spmd.run. Supervised, its HTTP side runs in "
                   "the supervisor: a client's stream goes on through a recovery.")
@click.option("--no-recover", is_flag=True,
              help="A lost rank ends the run (with one line naming it), instead of a relaunch on the survivors.")
@click.option("--max-recoveries", default=3, show_default=True, type=click.IntRange(min=0),
              help="Relaunches on the survivors before the run gives up.")
@click.option("--progress-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              callback=finite, metavar="S",
              help="A running job with no token for S seconds more than twice the slowest recent gap between tokens "
                   "(a rank stopped, a host asleep, a link down) has failed.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def cli(hostfile, ranks, timeout, serve, no_recover, max_recoveries, progress_timeout, run_args):
    """Check HOSTFILE's hosts, then run `python -m spmd.run RUN_ARGS` on them through mpirun, supervised: when a rank
    dies, its host goes or the job stalls, the run goes on from where it was on the survivors. With --serve,
    `python -m spmd.serve RUN_ARGS`."""
    hosts = parse_hostfile(hostfile) if hostfile else None
    if hosts is None and ranks is None:
        raise click.ClickException("give -n RANKS (all on this machine) or --hostfile")
    if hosts:
        check_reachable(hostfile, hosts, timeout)
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise click.ClickException("mpirun is not on PATH: run scripts/setup.sh and 'source .venv/bin/activate'")
    ranks = ranks or sum(slots for _, _, slots in hosts)
    if ranks > MOST_RANKS:
        raise click.ClickException(f"the hostfile's slots make {ranks} ranks; at most {MOST_RANKS} (give -n)")
    env = dict(os.environ, HYDRA_LAUNCHER_EXTRA_ARGS=f"-o ConnectTimeout={int(timeout)} -o BatchMode=yes")
    from .supervise import Supervisor, is_local
    first = hosts[0][1] if hosts else "localhost"  # where rank 0 runs
    if is_local(first):
        flags = server_flags(run_args) if serve else None
        status = Supervisor(mpirun, [(h, slots) for _, h, slots in hosts] if hosts else None, ranks, run_args,
                            progress_timeout=progress_timeout, max_recoveries=0 if no_recover else max_recoveries,
                            probe_timeout=min(timeout, 2.0), env=env, serve=flags).run()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job is over and its status known: a late Ctrl-C (a
        # second one, as a server stops) changes nothing (Python's exit restores the default handler, which would
        # end the launcher by SIGINT instead)
        sys.exit(status)
    print(f"note: rank 0 runs on {first}, not on this machine: the {'server' if serve else 'run'} is not "
          "supervised (a lost rank ends it); start spmd.launch there to have it supervised", file=sys.stderr)
    placed = ["-hosts", ",".join(f"{h}:{slots}" for _, h, slots in hosts)] if hosts else []  # (as checked)
    cmd = [mpirun, *placed, "-n", str(ranks), sys.executable, "-m",
           "spmd.serve" if serve else "spmd.run", *run_args]
    os.execve(mpirun, cmd, env)


def server_flags(run_args):
    """spmd.serve's flags the supervisor's HTTP side takes: (host, port, model id, queue limit, CORS origins). A
    mistake in any flag, or --help, ends here as spmd.serve would, before the port is bound."""
    from .run import EMBEDDED_MODEL, parse_args
    from .serve import cli
    kw = parse_args(list(run_args), True, cli, "python -m spmd.serve")
    if isinstance(kw, int):
        sys.exit(kw)
    model_id = kw["alias"] or os.path.basename(kw["model"] or EMBEDDED_MODEL)
    return kw["host"], kw["port"], model_id, kw["queue_limit"], kw["cors"]


def _stop(_signum, _frame):
    raise SystemExit(130)  # click takes a KeyboardInterrupt for "Aborted!" and status 1


def main():
    try:
        click_main(cli, "python -m spmd.launch", passed_on=(click.NoSuchOption,))
    except click.NoSuchOption as e:  # most often spmd.run's own flag given before "--"
        click.echo(f"error: {e.format_message()} The job's own flags go after --, as in python -m spmd.launch -n 2 "
                   f"-- {e.option_name} ... (see python -m spmd.launch --help)", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _stop)  # Ctrl-C before the supervisor takes the signals over (checking hosts)
    main()
