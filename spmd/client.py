"""The one client of the control socket (docs/control-protocol.md): used by `python -m spmd.migrate`, the scripts
and the tests.

    with Connection(path, timeout=10) as c:   # path: find_socket(None) finds the one running job's
        reply = c.ask({"cmd": "status"})       # one request line, one reply object
    reply = request(path, {"cmd": "migrate", "ratios": "1:1*1"})   # the same, on a connection of its own

Every failure (no socket, no reply in time, a reply that is not JSON) is a ClientError with a one-line message.
"""
import glob
import json
import os
import socket
import stat
import time

from .control import is_live, socket_dir

MAX_REPLY = 16 * 2**20  # bytes of one reply line read at most (a status of many ranks, fragmented shares)


BUSY_WAIT_S = 30.0  # how long `request` goes on asking a job that serves its most connections already


class ClientError(Exception):
    pass


def find_socket(path=None) -> str:
    """`path` if given, else the socket of the one running job in the per-user folder."""
    if path:
        return path
    found = sorted(glob.glob(os.path.join(socket_dir(), "control-*.sock")))
    live = [p for p in found if is_live(p)]
    if len(live) == 1:
        return live[0]
    if not live:
        raise ClientError(f"no running job has a control socket in {socket_dir()}; give --socket PATH")
    raise ClientError(f"{len(live)} jobs have control sockets: {', '.join(live)}; choose one with --socket PATH")


class Connection:
    """One connection to a job's control socket. `timeout` (seconds; None or 0: no limit) bounds the connect and
    each wait for a reply line."""

    def __init__(self, path, timeout=None):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout or None)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            why = e.strerror or e
            if isinstance(e, ConnectionRefusedError) and os.path.exists(path) and \
                    not stat.S_ISSOCK(os.stat(path).st_mode):  # (Linux says "Connection refused" of any other file)
                why = "not a socket (give a running job's control socket)"
            raise ClientError(f"cannot talk to {path}: {why}") from None
        self._lines = self._sock.makefile("rb")

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def close(self):
        self._lines.close()
        self._sock.close()

    def send(self, req):
        """One request: an object (sent as a JSON line) or raw bytes (sent as they are: tests of bad input)."""
        data = req if isinstance(req, bytes) else (json.dumps(req) + "\n").encode()
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise ClientError(f"cannot talk to {self.path}: {e.strerror or e}") from None

    def reply(self) -> dict:
        """The next reply line as an object."""
        try:
            line = self._lines.readline(MAX_REPLY + 1)
        except socket.timeout:
            raise ClientError(f"no reply from {self.path} in time") from None
        except OSError as e:
            raise ClientError(f"cannot talk to {self.path}: {e.strerror or e}") from None
        if not line:
            raise ClientError(f"{self.path} closed the connection without a reply")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ClientError(f"{self.path} replied with something that is not JSON: {line[:200]!r}") from None
        if not isinstance(reply, dict):
            raise ClientError(f"{self.path} replied with something that is not a control-socket reply (a JSON "
                              f"object): {line[:200]!r}")
        return reply

    def ask(self, req) -> dict:
        try:
            self.send(req)
        except ClientError:  # a job that turned the connection away at once (busy) has answered already
            try:
                return self.reply()
            except ClientError:
                pass
            raise
        return self.reply()


def request(path, req, timeout=None) -> dict:
    """One request on a connection of its own -> the reply object. Where the job already serves its most
    connections, it asks again a moment later, within `timeout` (None: BUSY_WAIT_S)."""
    give_up = time.monotonic() + (timeout or BUSY_WAIT_S)
    pause = 0.02
    while True:
        with Connection(path, timeout) as c:
            reply = c.ask(req)
        left = give_up - time.monotonic()
        if not reply.get("busy") or left <= 0:
            return reply
        time.sleep(min(pause, left))
        pause = min(2 * pause, 0.5)
