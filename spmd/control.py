"""The control socket: rank 0 listens on a Unix domain socket for live re-partition commands while it generates.

A daemon thread accepts connections; each connection gets its own daemon thread, which checks the peer's uid
(SO_PEERCRED: only the job's own user), reads newline-delimited JSON requests (one line, at most MAX_LINE bytes,
each whole line within IDLE_S seconds), validates each against the current plan (a reference to rank 0's state,
whose plan the main thread swaps) and replies on the same line-based channel. The protocol is specified in
docs/control-protocol.md; `spmd.client` is its one client.

Nothing here raises into the main thread: the driver calls `poll(pos)` between tokens (never blocking) and
`finish(request, reply)` once it has applied a request, and `close()` at the end.
"""
import json
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

from . import plan as P
from . import replan as R
from .errors import UserError, as_sent

MAX_LINE = 64 * 1024  # bytes in one request line
IDLE_S = 10.0  # a connection that sends no complete line for this long is closed
MAX_CONNECTIONS = 16
MAX_STATUS_WAITING = 64
MOST_AT = 2**53  # the furthest position 'at' may name (past it, a JSON client's numbers lose their units)
CLIENT_LOOK_S = 0.5  # how often a connection waiting for its migration looks whether its client is still there
FIELDS = {"status": {"cmd", "id"},
          "migrate": {"cmd", "id", "kind", "from", "to", "kv_groups", "ffn_blocks", "from_stage", "to_stage", "count",
                      "ratios", "mode", "at"}}
KINDS = {1: ("kv_groups",), 2: ("ffn_blocks",), 3: ("kv_groups", "ffn_blocks"), "layers": ("count",)}
MOVE_FIELDS = {"kind", "from", "to", "kv_groups", "ffn_blocks", "from_stage", "to_stage", "count"}


def runtime_dir():
    """$XDG_RUNTIME_DIR where it is a folder this user can write in, else None (unset, gone, or another user's after
    su: it is never created here)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return runtime if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK) else None


def socket_dir() -> str:
    """The per-user folder of control sockets: $XDG_RUNTIME_DIR/spmd (`runtime_dir`), or /tmp/spmd-<uid>."""
    runtime = runtime_dir()
    return os.path.join(runtime, "spmd") if runtime else f"/tmp/spmd-{os.getuid()}"


def default_path(pid=None) -> str:
    return os.path.join(socket_dir(), f"control-{os.getpid() if pid is None else pid}.sock")


def make_private_dir(path):
    """Create `path` mode 0700, or check that an existing one is ours, a real folder and closed to others."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise UserError(f"cannot create the control socket's folder {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UserError(f"{path} must be a folder of yours that only you can use (mode 0700); remove it or give "
                        "--control-socket PATH")


def remove_stale(folder):
    """Remove the socket files in the per-user folder whose job has died without removing its own (killed with
    SIGKILL, or taken down by mpirun when its output pipe closed)."""
    for name in os.listdir(folder):
        pid = name[len("control-"):-len(".sock")]
        if not (name.startswith("control-") and name.endswith(".sock") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
            continue  # the process is there (perhaps still starting): its file
        except PermissionError:
            continue
        except (ProcessLookupError, OverflowError):
            remove_if_stale(os.path.join(folder, name))


def remove_if_stale(path):
    """Remove the socket file at `path`, if it is ours and nobody listens there: its job's rank 0 has gone (the
    caller knows it) without removing its own (spmd.supervise calls it after a job that was taken down)."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid() and not is_live(path):
            os.unlink(path)
    except OSError:
        pass


def is_live(path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def peer_uid(conn) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def encode(obj) -> bytes:
    return (json.dumps(obj, separators=(", ", ": ")) + "\n").encode()


@dataclass
class Request:
    """A request waiting for the main thread: a `status`, or a migration with its new plan worked out."""
    cmd: str  # "status" | "migrate"
    id: object = None
    plan: object = None  # migrate: the new plan (its epoch one past the current one)
    at: int = None  # migrate: the position it is due at (None: the next token boundary)
    reply: dict = None
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False  # the main thread has it (a migration's client that leaves before cancels it, see `_serve`)


class Listener:
    """The socket, and what it validates against: `state.plan` (read when a request comes: the main thread swaps
    it), the position of the next token boundary, and of the last (None: no end, a server's)."""

    def __init__(self, path, state, first_boundary, last_boundary):
        self.path = path
        self._lock = threading.Lock()
        self._state = state
        self._next_boundary, self._last_boundary = first_boundary, last_boundary
        self._pending = None  # the one migration waiting or being applied
        self._status = []  # status requests waiting for the next boundary
        self._closed = False
        self._connections = 0
        self._open = set()  # the connections being served
        self._sock = self._bind(path)
        st = os.lstat(path)
        self._file_id = (st.st_dev, st.st_ino)
        self._thread = threading.Thread(target=self._accept_loop, name="spmd-control", daemon=True)
        self._thread.start()
        self._remove_on_signal()

    def _remove_on_signal(self):
        """Ctrl-C or SIGTERM ends the job, and the main thread may be blocked in a collective that never returns
        (the other ranks abort it). Python's C-level handler still writes to the wake-up fd at once: a thread
        waiting on it removes the socket file."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set the wake-up fd (tests build listeners in threads)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._wakeup = (w, signal.set_wakeup_fd(w))

        def wait():
            while os.read(r, 1):  # a signal (read on: a second one must find a reader); b"" once close() closed it
                self._unlink()
            os.close(r)
        threading.Thread(target=wait, name="spmd-control-signal", daemon=True).start()

    _wakeup = None  # (our wake-up fd, the one it replaced)

    def _unlink(self):
        """Remove the socket file if it is still ours."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._file_id:
                os.unlink(self.path)
        except OSError:
            pass

    # ---- set-up and tear-down ---------------------------------------------------------------------------------
    @staticmethod
    def _bind(path):
        if "\0" in path:
            raise UserError(f"control socket path {path!r} holds a NUL byte")
        if len(os.fsencode(path)) >= 108:
            raise UserError(f"control socket path {path} is too long for a Unix socket (107 bytes at most)")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise UserError(f"control socket path {path} exists and is not a socket")
            if is_live(path):
                raise UserError(f"control socket {path} is served by another job; give another --control-socket "
                                "PATH, or none")
            try:
                os.unlink(path)  # stale: its job has gone
            except OSError as e:
                raise UserError(f"cannot replace the stale control socket {path}: {e.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is created 0600, never open to others even for a moment
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise UserError(f"cannot create control socket {path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        sock.settimeout(0.2)
        return sock

    def close(self, pos=None):
        """Stop listening, remove the socket file, and answer every waiting request with an error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = self._status + ([self._pending] if self._pending is not None else [])
            self._status, self._pending = [], None
        stopped = f" (it stopped at position {pos})" if pos is not None else ""
        for r in waiting:
            if r.cmd == "status":
                why = "generation ended before the status could be gathered"
            else:
                why = f"generation ended before {'position ' + str(r.at) if r.at is not None else 'the next boundary'}"
            self._answer(r, {"ok": False, "error": why + stopped})
        self._unlink()
        if self._wakeup is not None and threading.current_thread() is threading.main_thread():
            w, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(w)
            self._wakeup = None
        self._sock.close()
        with self._lock:
            still_open = list(self._open)
        for conn in still_open:  # wake the connection threads: the job is over
            try:
                conn.shutdown(socket.SHUT_RD)  # a reply being sent still goes out
            except OSError:
                pass

    def queued(self) -> int:
        """Requests waiting for a token boundary (a migration not yet applied, status requests)."""
        with self._lock:
            return len(self._status) + (self._pending is not None and self._pending.reply is None)

    # ---- the main thread's side ---------------------------------------------------------------------------------
    def poll(self, pos) -> list:
        """At the token boundary before position `pos` is computed: the requests due now (status requests first,
        then at most one migration). Never blocks on the socket."""
        with self._lock:
            self._next_boundary = pos + 1
            due, self._status = self._status, []
            if self._pending is not None and self._pending.reply is None and (
                    self._pending.at is None or self._pending.at <= pos):
                self._pending.taken = True
                due.append(self._pending)
        return due

    def finish(self, request, reply):
        """The main thread has applied (or failed) `request`: send the reply."""
        with self._lock:
            if request is self._pending:
                self._pending = None
        self._answer(request, reply)

    @staticmethod
    def _answer(request, reply):
        if request.id is not None:
            reply = {"id": request.id, **reply}
        request.reply = reply
        request.done.set()

    # ---- requests ---------------------------------------------------------------------------------------------
    def handle(self, line: bytes):
        """One request line -> (an immediate reply dict, None) or (None, a queued Request)."""
        try:
            msg = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return {"ok": False, "error": f"malformed request: not JSON ({e})"[:300]}, None
        except RecursionError:
            return {"ok": False, "error": "malformed request: nested too deeply"}, None
        if not isinstance(msg, dict):
            return {"ok": False, "error": "malformed request: expected a JSON object"}, None
        rid = msg.get("id")
        if not (rid is None or isinstance(rid, (str, int)) and not isinstance(rid, bool) and len(str(rid)) <= 100):
            return {"ok": False, "error": "'id' must be a string or an integer of at most 100 characters"}, None
        try:
            with self._lock:
                if self._closed:
                    raise UserError("generation has ended")
                request = self._validate(msg)
                if request.cmd == "status":
                    if len(self._status) >= MAX_STATUS_WAITING:
                        raise UserError("too many status requests waiting")
                    self._status.append(request)
                else:
                    self._pending = request
            return None, request
        except UserError as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug: still one reply, and the job goes on
            reply = {"ok": False, "error": f"the job could not handle the request ({type(e).__name__}: {e})"[:300]}
        return ({"id": rid, **reply} if rid is not None else reply), None

    def _validate(self, msg) -> Request:
        """A request from a parsed message, checked against the current state (the lock is held)."""
        cmd = msg.get("cmd")
        if not isinstance(cmd, str) or cmd not in FIELDS:
            raise UserError(f"unknown command {as_sent(cmd)}: expected 'status' or 'migrate'")
        unknown = sorted(set(msg) - FIELDS[cmd])
        if unknown:
            raise UserError(f"unknown field{'s' * (len(unknown) > 1)} for {cmd}: {', '.join(map(repr, unknown))}"[:300])
        if cmd == "status":
            return Request("status", msg.get("id"))
        if self._pending is not None:
            raise UserError(f"another migration is pending (epoch {self._pending.plan.epoch}); wait for its reply")
        at = self._due_position(msg)
        plan = self._state.plan
        if "ratios" in msg:
            extra = sorted(MOVE_FIELDS & set(msg))
            if extra:
                raise UserError(f"give either 'ratios' or 'kind' with what to move, not both ({', '.join(extra)})")
            new = R.relayout(plan, P.parse_layout(_ratios_text(msg["ratios"]), len(plan), name="ratios"))
            return Request("migrate", msg.get("id"), new, at)
        kind = msg.get("kind")
        if "kind" not in msg:
            raise UserError("migrate needs 'kind' (or a whole new 'ratios')")
        if not isinstance(kind, (int, str)) or isinstance(kind, bool) or kind not in KINDS:
            raise UserError(f"unknown kind {as_sent(kind)}: 1 moves attention heads, 2 FFN columns, 3 both, "
                            f"'layers' layers between stages")
        places = ("from_stage", "to_stage") if kind == "layers" else ("from", "to")
        for key in places + KINDS[kind]:
            if key not in msg:
                raise UserError(f"kind {kind!r} needs '{key}'")
        extra = sorted(MOVE_FIELDS - {"kind"} - set(places) - set(KINDS[kind]) & set(msg))
        if extra:
            raise UserError(f"kind {kind!r} takes no {extra[0]!r}")
        if kind == "layers":
            new = R.move_layers(plan, msg["from_stage"], msg["to_stage"], msg["count"])
        else:
            new = R.move_units(plan, msg["from"], msg["to"], msg.get("kv_groups"), msg.get("ffn_blocks"))
        return Request("migrate", msg.get("id"), new, at)

    def _due_position(self, msg):
        mode = msg.get("mode", "at" if "at" in msg else "next")
        if mode not in ("next", "at"):
            raise UserError(f"unknown mode {as_sent(mode)}: expected 'next' or 'at'")
        if mode == "next":
            if "at" in msg:
                raise UserError("mode 'next' takes no 'at'")
            at = None
        else:
            at = msg.get("at")
            if not isinstance(at, int) or isinstance(at, bool) or at < 0:
                raise UserError(f"mode 'at' needs 'at': a token position, a whole number from 0 (got {as_sent(at)})")
            if at > MOST_AT:
                raise UserError(f"position {at} is too far ahead: 'at' is at most 2^53")
            if at < self._next_boundary:
                raise UserError(f"position {at} has passed: the next token boundary is at position "
                                f"{self._next_boundary}")
        due, last = at if at is not None else self._next_boundary, self._last_boundary
        if last is not None and last < self._next_boundary:
            raise UserError("no token boundary is left in this generation")
        if last is not None and due > last:
            raise UserError(f"generation ends before position {due} (its last token boundary is at position {last})")
        return at

    # ---- the listener thread ----------------------------------------------------------------------------------
    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed:
                    return
                continue
            try:
                self._admit(conn)
            except Exception:  # noqa: BLE001 - nothing from a client may end the listener
                conn.close()

    def _admit(self, conn):
        uid = peer_uid(conn)
        if uid != os.getuid():
            _send(conn, {"ok": False, "error": f"refused: the job belongs to uid {os.getuid()}, not {uid}"})
            conn.close()
            return
        with self._lock:
            busy = self._connections >= MAX_CONNECTIONS
            self._connections += not busy
        if busy:
            _send(conn, {"ok": False, "busy": True,
                         "error": f"too many connections (at most {MAX_CONNECTIONS}); try again"})
            conn.close()
            return
        threading.Thread(target=self._serve, args=(conn,), name="spmd-control-conn", daemon=True).start()

    def _serve(self, conn):
        with self._lock:
            self._open.add(conn)
        try:
            buffer = b""
            while not self._closed:
                line, buffer = _read_line(conn, buffer, time.monotonic() + IDLE_S)
                if line is None:
                    return
                if len(line) > MAX_LINE:
                    _send(conn, {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
                    return
                if not line.strip():
                    continue
                reply, request = self.handle(line)
                if request is not None:
                    while not request.done.wait(CLIENT_LOOK_S):  # finish() or close() answers every queued request
                        if _gone(conn) and self._cancel(request):
                            return
                    reply = request.reply
                _send(conn, reply)
        except Exception:  # noqa: BLE001 - a client that misbehaves or leaves is dropped, nothing more
            pass
        finally:
            with self._lock:
                self._connections -= 1
                self._open.discard(conn)
            conn.close()

    def _cancel(self, request):
        """A migration whose client has gone, while the main thread has not taken it: dropped (else it would stay
        pending, refusing every other, until its position came). Whether it was."""
        with self._lock:
            if request is not self._pending or request.taken:
                return False
            self._pending = None
            return True


def _gone(conn):
    """Whether the client has closed its socket. One that only shut its writing side (a request sent, then
    shutdown(SHUT_WR), as `nc -N` or `socat` do) still reads its reply: on Linux, a Unix socket whose peer has
    closed both ways polls as hung up, one whose peer shut its writing side only as readable at its end."""
    try:
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))
    except OSError:
        return True


def _ratios_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return ":".join(repr(v) for v in value)
    raise UserError(f"'ratios' must be a string such as '1:1:2' or a list of positive numbers (got {as_sent(value)})")


def _read_line(conn, buffer, deadline):
    """(one line without its newline, the rest) or (None, b"") at end of stream, when the line is not complete by
    `deadline` (time.monotonic(): a whole request, however slowly its bytes come), or once the line passes MAX_LINE
    bytes without a newline (returned as it is, over the limit, for the caller to refuse)."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            return buffer, b""
        left = deadline - time.monotonic()
        if left <= 0:
            return None, b""
        try:
            conn.settimeout(left)
            chunk = conn.recv(65536)
        except (socket.timeout, OSError):
            return None, b""
        if not chunk:
            return None, b""  # the client left, perhaps in the middle of a line: dropped
        buffer += chunk
    line, rest = buffer.split(b"\n", 1)
    return line, rest


def _send(conn, reply):
    conn.sendall(encode(reply))  # an OSError (the client left) drops the connection
