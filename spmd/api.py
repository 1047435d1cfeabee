"""spmd.serve's HTTP side, on rank 0 only: an OpenAI-compatible API (aiohttp), the page at `/`, and the cluster's
status for it. It runs an asyncio loop on its own thread; the driver (on the main thread, which does every MPI
call) takes each request from the `Inbox` and gives its text back through the request's `Sink`.

Endpoints: GET /health (503 while the model loads, then 200), GET /v1/models (and /v1/models/ID), POST
/v1/completions and /v1/chat/completions (streamed as server-sent events or not), GET /cluster (the control socket's
`status`, with the server's own figures), GET / (the page). A mistake in a request is HTTP 400 with an
OpenAI-style `error` object; a full queue 429 with Retry-After.
"""
import asyncio
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from .chat_template import ROLES, TemplateError
from .errors import as_sent
from .prompts import PromptSpec, Work
from .sampling import MOST_TOP_K

MAX_BODY_BYTES = 4 * 2**20
BODY_WAIT_S = 30.0  # a request's body must have come whole within this long
LINGER_S = 1.0  # after answering a request whose body it did not read, the server reads what comes of it this long
# before it closes the connection (aiohttp's lingering_time, 10 s by default): a client that sent it all gets the
# answer rather than a reset
# Content-Encodings of a request body the server decodes itself (`decoded_body`: aiohttp's own decoding is off, as it
# answers an encoding whose library is not installed in plain text before a handler runs, and takes a gzip stream
# without its end)
DECODED = ("identity", "gzip", "deflate")
IDLE_S = 10.0  # a connection without a request in progress for this long is closed (see Connections)
WRITE_WAIT_S = 30.0  # an answer's write that waits this long for room in the connection's buffers (a client that
# stopped reading) drops the connection
WRITE_PIECE = 64 * 1024  # a whole answer's bytes a write (each has its WRITE_WAIT_S: a slow reader keeps going)
MAX_STOPS, MAX_STOP_CHARS = 16, 256
STATUS_WAIT_S = 10.0  # the driver answers /cluster at its next token boundary; it is there within a token
CHECK_CLIENT_S = 0.25  # how often a request waiting for its next token looks whether its client is still there
# Fields that change what is generated or returned and that spmd does not do (OpenAI's, and llama.cpp's and vLLM's
# sampling extensions): refused unless null or one of these no-op values
UNSUPPORTED = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
               "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
               "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "echo": (False,),
               "best_of": (1,), "suffix": ("",), "modalities": (["text"],), "audio": (), "prediction": (),
               "min_p": (0,), "typical_p": (1,), "repeat_penalty": (1,), "repetition_penalty": (1,),
               "ignore_eos": (False,), "grammar": ("",), "json_schema": (), "guided_json": (), "guided_regex": (),
               "guided_choice": (), "mirostat": (0,)}
FINISH = {"eos": "stop", "length": "length"}  # the driver's end -> OpenAI's finish_reason


class OneLine(logging.Filter):
    """aiohttp logs a request it cannot parse (not HTTP, a bad header) with a traceback on the server's stderr: one
    line is enough (the client got its 400). A body of malformed chunks, found as aiohttp drains what a handler
    left unread after its answer, is the client's, and said to it already: nothing."""

    def filter(self, record):
        if record.exc_info:
            e = record.exc_info[1]
            if isinstance(e, web.RequestPayloadError):
                return False
            detail = " ".join(str(e).split())[:200]
            record.msg, record.args = f"note: {record.getMessage()}: {type(e).__name__} {detail}".rstrip(), ()
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("aiohttp.server").addFilter(OneLine())


def decoded_body(raw, encoding) -> bytes:
    """A request body of `encoding` (one of DECODED) decoded, whole and at most MAX_BODY_BYTES: BadRequest where it
    does not decode, or ends early (a gzip stream without its end), web.HTTPRequestEntityTooLarge where larger."""
    if encoding == "identity":
        return raw
    # deflate: zlib's format, or the raw deflate that some clients send (its first byte's low bits are not 8)
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS if raw[:1] and raw[0] & 15 == 8 else \
        -zlib.MAX_WBITS
    out, rest = b"", raw
    while True:  # (gzip: one member after another, as RFC 1952 allows)
        stream = zlib.decompressobj(wbits)
        try:
            out += stream.decompress(rest, MAX_BODY_BYTES + 1 - len(out))
        except zlib.error:
            raise BadRequest(f"the body could not be read: Can not decode content-encoding: {encoding}") from None
        if len(out) > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(out))
        if not stream.eof:
            raise BadRequest(f"the body could not be read: its {encoding} stream ends early")
        rest = stream.unused_data
        if not rest:
            return out
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
            raise BadRequest(f"the body could not be read: its {encoding} stream has bytes after its end")


class BadRequest(Exception):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def listen_error(e):
    """Why binding failed, in a few words (aiohttp's OSError repeats the address)."""
    if isinstance(e, socket.gaierror):  # (a host name that does not resolve: its errno is the resolver's)
        return f"no such host or address ({e.strerror})"
    return os.strerror(e.errno) if e.errno else str(e)


def address(host, port):
    """host:port as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serving_line(model_id, host, port, n_ranks, slots, context, more=""):
    """The line that says where the server listens, once the model has loaded (`more`: said after the figures)."""
    return (f"serving {model_id} on http://{address(host, port)} ({n_ranks} rank{'s' * (n_ranks > 1)}, {slots} "
            f"sequence{'s' * (slots > 1)} of up to {context} positions at once{more})")


def error_response(status, message, kind="invalid_request_error", param=None, headers=None):
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                             status=status, headers=headers)


def unread(response):
    """A response to a request whose body was not read: the connection closes after it (what is left of the body
    would be read as the next request), within LINGER_S."""
    response.force_close()
    return response


def body_encoding(request) -> str:
    """A request's Content-Encoding as DECODED names them."""
    return request.headers.get("Content-Encoding", "identity").strip().lower()


def too_large():
    return unread(error_response(413, f"the body is larger than {MAX_BODY_BYTES >> 20} MiB"))


def loading():
    return error_response(503, "the model is loading", "unavailable_error", headers={"Retry-After": "2"})


@web.middleware
async def json_errors(request, handler):
    """aiohttp's own errors (no such path: 404; not that method: 405, with its Allow header) as the API's JSON
    error body, as OpenAI's API answers them, where aiohttp answers in plain text."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(e.status, f"{e.reason}: {request.method} {request.path}"[:200], headers=allow)


class Inbox:
    """Where the HTTP thread leaves work for the driver (thread-safe); supervised, for the supervisor, which passes
    it on to the job (spmd.front). A sink takes a sequence's text: `piece(text, n_tokens)` as it comes,
    `done(finish, n_tokens)` once at its end (both called on the driver's or the supervisor's thread), and has
    `cancelled`, which the server sets when it wants no more."""

    def __init__(self, on_wake=None):
        self._lock, self._wake = threading.Lock(), threading.Event()
        self._work, self._status = [], []
        self.closed = False
        self.on_wake = on_wake or (lambda: None)  # also told of every put, ask and close (spmd.front's supervisor)

    def put(self, work, sink):
        with self._lock:
            if self.closed:
                return False
            self._work.append((work, sink))
        self._wake.set()
        self.on_wake()
        return True

    def ask_status(self, reply):
        """`reply(status dict)` at the next token boundary, on the driver's thread."""
        with self._lock:
            self._status.append(reply)
        self._wake.set()
        self.on_wake()

    def close(self):
        """No more work: the driver ends what is in flight and stops."""
        self.closed = True
        self._wake.set()
        self.on_wake()

    def take(self, wait_s):
        """(new work with its sinks, status replies), waiting up to `wait_s` for either."""
        if wait_s and not self._wake.wait(wait_s):
            return [], []
        with self._lock:
            self._wake.clear()
            work, self._work = self._work, []
            status, self._status = self._status, []
        return work, status


@dataclass
class Gateway:
    """What the server needs from the loaded engine (rank 0)."""
    inbox: Inbox
    tokenizer: object
    template: object  # chat_template.ChatTemplate
    context: int  # positions per sequence (--ctx-size)
    n_known: int  # token ids the model and tokenizer both know
    slots: int  # sequences in flight at most (--sequences)


class Sink:
    """One request's side of the driver: text pieces and the end come in on the driver's thread and are put on
    an asyncio queue for the handler; `cancelled` (set here) tells the driver to end the sequence."""

    def __init__(self, loop):
        self.loop, self.events, self.cancelled = loop, asyncio.Queue(), False

    def _put(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop has closed: nobody is waiting any more
            pass

    def piece(self, text, n_tokens):
        self._put(("piece", text, n_tokens))

    def done(self, finish, n_tokens):
        self._put(("done", finish, n_tokens))


class StopFilter:
    """Cuts the text at the first of the stop strings (none of it appears in the output) and holds back the end
    of the text while it could be the start of one."""

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def push(self, text):
        """(text that may go out now, whether a stop string was found)."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held = self.held[:min(found)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self):
        out, self.held = self.held, ""
        return out


# ---- request fields ---------------------------------------------------------------------------------------------
def _number(body, name, lo, hi, default, integer=False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)) \
            or value > hi or value < lo:
        kind = "a whole number" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} in [{lo}, {hi}] (got {as_sent(value)})", name)
    return value


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS \
            or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} strings of at most "
                         f"{MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s]


def _json_object(raw):
    """The request's body: a JSON object of text (no unpaired UTF-16 surrogate, which JSON's \\u escapes can
    write but no text holds)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        if "integer string conversion" in str(e):  # (Python's limit on a whole number's digits)
            raise BadRequest("the body holds a whole number of more digits than this server reads (4300)") from None
        raise BadRequest(f"the body is not JSON ({e})"[:200]) from None
    except RecursionError:
        raise BadRequest("the body is not JSON this server reads (nested too deeply)") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"the body holds an unpaired UTF-16 surrogate ({json.dumps(e.object[e.start:e.end])}), "
                         "which is not text") from None
    except RecursionError:
        raise BadRequest("the body is not JSON this server reads (nested too deeply)") from None
    return body


def _sampling(body):
    """The request's sampling fields, checked."""
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == n and isinstance(value, bool) == isinstance(n, bool)
                                         for n in neutral):
            said = " or ".join(json.dumps(n) for n in (None, *neutral))
            raise BadRequest(f"'{name}' is not supported by spmd (only {said})", name)
    if not isinstance(body.get("model", ""), str):
        raise BadRequest("'model' must be a string (this server has one model: any name is taken as it)", "model")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise BadRequest("'n' must be 1: one answer a request", "n")
    caps = [_number(body, name, 1, 2**31 - 1, None, integer=True) for name in ("max_completion_tokens", "max_tokens")]
    max_tokens = next((cap for cap in caps if cap is not None), None)  # (null: not given)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise BadRequest("'stream_options' is only for a streamed answer (\"stream\": true)", "stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", None), (bool, type(None))):
        raise BadRequest("'stream_options' must be an object with 'include_usage' true or false", "stream_options")
    return dict(max_tokens=max_tokens, stream=bool(stream), usage=bool(options.get("include_usage")),
                temperature=_number(body, "temperature", 0, 2, 1.0),
                top_p=_number(body, "top_p", 0, 1, 1.0),  # (0: the most probable token alone)
                top_k=_number(body, "top_k", 0, MOST_TOP_K, 0, integer=True),
                seed=_seed(body), stop=_stops(body))


def _seed(body):
    seed = _number(body, "seed", -2**63, 2**64 - 1, None, integer=True)
    return None if seed is None else seed % 2**64  # the generator takes whole numbers from 0


def _messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"{where} must be an object with 'role' one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, list):  # parts: only text is understood
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text":
                    kind = as_sent(p.get("type")) if isinstance(p, dict) else "not an object"
                    raise BadRequest(f"{where}.content[{j}]: only text parts are supported (got {kind})", "messages")
                if not isinstance(p.get("text"), str):
                    raise BadRequest(f"{where}.content[{j}].text must be text", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be text", "messages")
        role = "system" if m["role"] == "developer" else m["role"]  # (OpenAI's newer name for it)
        out.append({"role": role, "content": content})
    return out


def _prompt(body):
    """A completion's prompt: text, or token ids."""
    if "messages" in body:
        raise BadRequest("'messages' belongs to /v1/chat/completions; /v1/completions takes a 'prompt'", "messages")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    raise BadRequest("'prompt' must be a string or a list of token ids (one prompt: n=1)", "prompt")


# ---- the server ----------------------------------------------------------------------------------------------
class Cors:
    """Which web pages may call the API. A browser names the page's origin in a request's Origin header (a client
    that is not a browser sends none); the server's own page has the server's origin (the Host it asked). A request
    from any other page is refused (403: a page elsewhere cannot make the server generate, though it could not read
    the answer), unless --cors names that origin ("*": any): then a preflight (OPTIONS with
    Access-Control-Request-Method) is answered 204 with the methods and the headers it asks for, and every response,
    streams included, carries Access-Control-Allow-Origin."""

    def __init__(self, origins):
        self.origins = tuple(origins)

    def allows(self, request):
        origin = request.headers.get("Origin")
        return origin is not None and ("*" in self.origins or origin in self.origins)

    @staticmethod
    def own(request, origin):
        try:
            parts = urlsplit(origin)
        except ValueError:  # (not a URL: "null", say, is one that parses)
            return False
        return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()

    @web.middleware
    async def middleware(self, request, handler):
        origin = request.headers.get("Origin")
        if origin is None or self.own(request, origin):
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers and self.allows(request):
            return web.Response(status=204)
        if not self.allows(request) and request.method != "OPTIONS":
            return error_response(403, f"a page of another origin ({origin[:100]}) may not call this server: "
                                       "allow it with --cors", "permission_error")
        return await handler(request)

    async def headers(self, request, response):  # (aiohttp's on_response_prepare: before the headers go out)
        if not self.allows(request):
            return
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in self.origins else request.headers["Origin"]
        response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            asked = request.headers.get("Access-Control-Request-Headers", "")  # (OpenAI's SDK asks for its own)
            response.headers["Access-Control-Allow-Headers"] = asked[:1000] or "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"


class Hosts:
    """A guard against DNS rebinding, where the server listens on loopback addresses only (the default): a page of
    another site whose name is then made to resolve to 127.0.0.1 has the server's origin by Cors' rule, so it could
    call the API and read the answers. Such a server answers only requests that name it by an IP address, by
    localhost (or a name under .localhost), by this machine's name, or by the name --host gave; others are 403. A
    request without a Host header comes from no browser. A server listening on other addresses answers any name."""

    def __init__(self, listen_host):
        self.guard, self.listen_host = False, listen_host
        self.names = {"localhost", socket.gethostname().lower(), listen_host.lower()}

    def listening_on(self, addresses):
        """The addresses the server's sockets were bound to: the guard is on where every one is a loopback one."""
        self.guard = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)

    def allows(self, host):
        try:
            name = urlsplit("//" + host).hostname or ""
        except ValueError:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.names or name.endswith(".localhost")

    @web.middleware
    async def middleware(self, request, handler):
        host = request.headers.get("Host")
        if not self.guard or host is None or self.allows(host):
            return await handler(request)
        return error_response(403, f"this server listens on {self.listen_host} only and answers to localhost or an IP "
                                   f"address, not to the name in Host ({host[:100]}): a guard against DNS rebinding "
                                   "(a proxy in front of it should send Host: localhost)", "permission_error")


class Connections:
    """Closes a connection that holds no request in progress for IDLE_S: a client sending its headers a byte at a
    time, or an idle keep-alive, holds a connection (a file descriptor) that long at most, where aiohttp bounds
    neither. A request is in progress from its headers' end to its response's end (a stream included)."""

    def __init__(self):
        self.busy, self.since = {}, {}  # connection -> requests in progress; -> when it was last seen busy

    @web.middleware
    async def middleware(self, request, handler):
        conn = request.protocol
        self.busy[conn] = self.busy.get(conn, 0) + 1
        try:
            return await handler(request)
        finally:
            self.busy[conn] -= 1
            self.since[conn] = time.monotonic()

    async def sweep(self, server):
        while True:
            await asyncio.sleep(min(1.0, IDLE_S / 4))
            now, open_now = time.monotonic(), set(server.connections)
            self.busy = {c: n for c, n in self.busy.items() if c in open_now}
            self.since = {c: t for c, t in self.since.items() if c in open_now}
            for conn in open_now:
                since = self.since.setdefault(conn, now)
                if not self.busy.get(conn) and now - since > IDLE_S and conn.transport is not None:
                    conn.transport.close()


class Server:
    """The HTTP server on its own thread. `start()` binds (an OSError if it cannot), `open(gateway)` once the
    model has loaded, `stop()` at the end."""

    def __init__(self, host, port, model_id, queue_limit, cors=()):
        self.host, self.port, self.model_id, self.queue_limit = host, port, model_id, queue_limit
        self.gateway, self.created = None, int(time.time())
        self.active = 0  # requests accepted and not yet answered (on the loop's thread only)
        self.loop, self._thread, self._runner = None, None, None
        self.connections = Connections()
        self.hosts, cors = Hosts(host), Cors(cors)
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[
            self.connections.middleware, self.hosts.middleware, cors.middleware, json_errors])
        app.on_response_prepare.append(cors.headers)
        app.add_routes([web.get("/health", self.health), web.get("/v1/models", self.models),
                        web.get("/v1/models/{id:.+}", self.model),  # (an id may hold "/": org/name)
                        web.post("/v1/completions", self.completions, expect_handler=self._expect),
                        web.post("/v1/chat/completions", self.chat_completions, expect_handler=self._expect),
                        web.get("/cluster", self.cluster), web.get("/", self.page)])
        self.app = app

    # -- life cycle --
    def start(self):
        started, failure = threading.Event(), []

        def main():
            loop = self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0, lingering_time=LINGER_S,
                                         auto_decompress=False)  # (decoded_body)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            try:
                loop.run_until_complete(site.start())
                sockets = site._server.sockets
                self.port = sockets[0].getsockname()[1]  # the real one where --port was 0
                self.hosts.listening_on([s.getsockname()[0] for s in sockets])
            except OSError as e:
                failure.append(e)
                loop.run_until_complete(self._runner.cleanup())
                loop.close()
                started.set()
                return
            started.set()
            sweep = loop.create_task(self.connections.sweep(self._runner.server))
            loop.run_forever()
            sweep.cancel()
            loop.run_until_complete(self._runner.cleanup())
            left = asyncio.all_tasks(loop)  # connections that were still open: end them before the loop closes
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=main, name="spmd-http", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def open(self, gateway):
        self.gateway = gateway

    def stop(self):
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    # -- endpoints --
    async def health(self, _request):
        if self.gateway is None:
            return loading()
        return web.json_response({"status": "ok"})

    async def models(self, _request):
        return web.json_response({"object": "list", "data": [self._model_object()]})

    def _model_object(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "spmd"}

    async def model(self, request):
        if request.match_info["id"] != self.model_id:
            return error_response(404, f"no model {request.match_info['id']!r} here: this server has "
                                       f"{self.model_id!r}", param="model")
        return web.json_response(self._model_object())

    async def page(self, _request):
        html = resources.files("spmd").joinpath("page.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html")

    async def cluster(self, _request):
        if self.gateway is None:
            return loading()
        loop, answer = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()

        def reply(status):
            loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(status))
        self.gateway.inbox.ask_status(reply)
        try:
            status = await asyncio.wait_for(answer, STATUS_WAIT_S)
        except asyncio.TimeoutError:
            status = None
        if status is None:
            return error_response(503, "the cluster did not answer (it is stopping, recovering from a lost machine, "
                                       "or busy moving work)",
                                  "unavailable_error")
        return web.json_response({**status, "model": self.model_id})

    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    # -- generation --
    def _refused_unread(self, request):
        """The answer to a generation request that its head alone refuses (the model loading, a Content-Encoding
        the server does not decode, a declared length over the limit: not worth waiting for), else None."""
        if self.gateway is None:
            return unread(loading())
        encoding = body_encoding(request)
        if encoding not in DECODED:
            return unread(error_response(415, f"the body's Content-Encoding {encoding[:40]!r} is not one this server "
                                              f"decodes ({', '.join(DECODED[1:])})"))
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return too_large()
        return None

    async def _expect(self, request):
        """`Expect: 100-continue`: a request its head refuses is answered at once, without the 100 that would have
        the client send its body first (aiohttp's own handler sends it whatever the request)."""
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return unread(error_response(417, f"Expect: {expect[:40]!r} is not one this server meets (100-continue)"))
        refused = self._refused_unread(request)
        if refused is None and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # (the answer's own size starts after the 100)
        return refused

    async def _generate(self, request, chat):
        refused = self._refused_unread(request)
        if refused is not None:
            return refused
        gw = self.gateway
        try:
            try:
                raw = await asyncio.wait_for(request.read(), BODY_WAIT_S)
            except asyncio.TimeoutError:
                return unread(error_response(408, f"the request's body did not come whole within {BODY_WAIT_S:.0f} s"))
            except ConnectionError:  # the client went away while sending it
                return web.Response(status=499)
            except web.RequestPayloadError as e:  # (a bad chunk)
                detail = " ".join(str(e).split())  # ("400, message:\n  ...": the why alone)
                detail = detail.split("message: ", 1)[-1] if detail[:3].isdigit() else detail
                raise BadRequest(f"the body could not be read: {detail}"[:200]) from None
            raw = decoded_body(raw, body_encoding(request))
            body = {name: value for name, value in _json_object(raw).items() if value is not None}  # null: not given
            params = _sampling(body)
            source = _messages(body) if chat else _prompt(body)
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(None, self._tokens, source, chat)
        except web.HTTPRequestEntityTooLarge:
            return too_large()
        except BadRequest as e:
            return error_response(400, str(e), param=e.param)
        room = gw.context - len(ids)
        if room < 1:
            return error_response(400, f"the prompt is {len(ids)} tokens; a sequence holds {gw.context} "
                                       "(--ctx-size), which leaves no room to generate", param="messages" if chat
                                  else "prompt")
        if self.active >= gw.slots + self.queue_limit:
            return error_response(429, f"{gw.slots} requests are being answered and {self.queue_limit} are waiting "
                                       "(--sequences, --queue): try again shortly", "rate_limit_error",
                                  headers={"Retry-After": "1"})
        steps = min(params["max_tokens"] or room, room)
        spec = PromptSpec(ids=tuple(ids), steps=steps, temperature=params["temperature"], top_k=params["top_k"],
                          top_p=params["top_p"], seed=params["seed"], where="the request")
        sink = Sink(asyncio.get_running_loop())
        if not gw.inbox.put(Work(next(_counter), np.array(ids, np.int64), steps, spec), sink):
            return error_response(503, "the server is stopping", "unavailable_error")
        reply = Reply(self, request, sink, chat, params, len(ids))
        self.active += 1
        try:
            return await (reply.stream() if params["stream"] else reply.whole())
        finally:
            self.active -= 1
            sink.cancelled = True  # whatever ended the handler (done, a stop string, the client gone): no more

    def _tokens(self, source, chat):
        """Prompt token ids (on a worker thread: a long prompt takes a while)."""
        gw = self.gateway
        if isinstance(source, tuple):
            if max(source) >= gw.n_known or min(source) < 0:
                raise BadRequest(f"token ids must be in 0..{gw.n_known - 1}", "prompt")
            return list(source)
        if chat:
            try:
                text = gw.template.render(source)
            except TemplateError as e:
                raise BadRequest(str(e), "messages") from None
            self._fits(text, "messages")
            return gw.tokenizer.encode(text, controls=True)
        self._fits(source, "prompt")
        ids = gw.tokenizer.encode(source)
        if not ids:
            raise BadRequest("the prompt is empty and this model adds no BOS token to start from", "prompt")
        return ids

    def _fits(self, text, param):
        """Refuse, before tokenizing it, a text too long for a sequence whatever its tokens: tokenizing megabytes
        would hold rank 0's driver back meanwhile."""
        gw = self.gateway
        n = gw.tokenizer.bytes_beyond(text, gw.context)
        if n is not None:
            raise BadRequest(f"the prompt is {n} bytes: more than a sequence of {gw.context} positions "
                             "(--ctx-size) can hold", param)


_counter = iter(range(1, 2**62))  # request numbers (the driver's sequence index)


class Reply:
    """One request's answer, from its sink's events: streamed as server-sent events, or whole."""

    def __init__(self, server, request, sink, chat, params, n_prompt):
        self.server, self.request, self.sink, self.chat, self.params = server, request, sink, chat, params
        self.n_prompt, self.n_tokens, self.finish = n_prompt, 0, None
        self.stops = StopFilter(params["stop"])
        self.leading = chat  # no text yet, whose leading space a chat answer drops (see _texts)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _client_gone(self):
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def _texts(self):
        """The answer's text as it comes, cut at a stop string; sets finish and n_tokens. Where the client went away
        it ends with finish still None (the sequence is cancelled). A chat answer starts without the space that the
        first word of a sentencepiece vocabulary carries ("▁Hello"), as the answer's tokens decoded alone read; a
        completion keeps it, as it goes on from the prompt ("Once upon a" -> " time")."""
        while True:
            try:
                event = await asyncio.wait_for(self.sink.events.get(), CHECK_CLIENT_S)
            except asyncio.TimeoutError:
                if self._client_gone():
                    self.sink.cancelled = True
                    return
                continue
            if event[0] == "piece":
                _, text, self.n_tokens = event
                if self.leading and text:
                    text, self.leading = text.removeprefix(" "), False
                out, hit = self.stops.push(text)
                if out:
                    yield out
                if hit:
                    self.sink.cancelled, self.finish = True, "stop"
                    return
                if self._client_gone():
                    self.sink.cancelled = True
                    return
            else:
                _, finish, self.n_tokens = event
                out = self.stops.flush()
                if out:
                    yield out
                self.finish = FINISH.get(finish, "stopped")
                return

    def usage(self):
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_tokens,
                "total_tokens": self.n_prompt + self.n_tokens}

    def _choice(self, text, finish, delta=None):
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if delta is None:
            delta = {"content": text} if finish is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _chunk(self, choices, **extra):
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_id,
                "choices": choices, **extra}

    async def whole(self):
        text = "".join([t async for t in self._texts()])
        if self.finish is None:  # the client has gone: nobody to answer
            return web.Response(status=499)
        if self.finish == "stopped":
            return error_response(503, "the server stopped before the answer was complete", "unavailable_error")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish}
        kind = "chat.completion" if self.chat else "text_completion"
        body = json.dumps({"id": self.id, "object": kind, "created": self.created, "model": self.server.model_id,
                           "choices": [choice], "usage": self.usage()}).encode()
        # written here a piece at a time, each within WRITE_WAIT_S as a stream's writes are (aiohttp's own write of
        # a returned response waits for ever for a client that reads nothing)
        response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        response.content_length = len(body)
        try:
            await response.prepare(self.request)
            for at in range(0, len(body), WRITE_PIECE):
                await _write(response, body[at:at + WRITE_PIECE])
            await asyncio.wait_for(response.write_eof(), WRITE_WAIT_S)
        except (ConnectionError, asyncio.TimeoutError):
            _drop(self.request)
        return response

    async def stream(self):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(self.request)
        usage = {"usage": None} if self.params["usage"] else {}
        try:
            if self.chat:  # the first chunk names the role only
                await _event(response, self._chunk([self._choice("", None, {"role": "assistant", "content": ""})],
                                                   **usage))
            async for text in self._texts():
                await _event(response, self._chunk([self._choice(text, None)], **usage))
            if self.finish is None:
                return response
            if self.finish == "stopped":
                await _event(response, {"error": {"message": "the server stopped before the answer was complete",
                                                  "type": "unavailable_error", "param": None, "code": None}})
            else:
                await _event(response, self._chunk([self._choice("", self.finish)], **usage))
                if self.params["usage"]:
                    await _event(response, self._chunk([], usage=self.usage()))
            await _write(response, b"data: [DONE]\n\n")
            await asyncio.wait_for(response.write_eof(), WRITE_WAIT_S)
        except (ConnectionError, asyncio.TimeoutError):  # the client went away mid-stream, or stopped reading
            self.sink.cancelled = True
            _drop(self.request)
        return response


def _drop(request):
    """The connection of a client that went away or stopped reading, closed at once (what is buffered for it goes
    too)."""
    if request.transport is not None:
        request.transport.abort()


async def _write(response, data):
    """One write of an answer, within WRITE_WAIT_S: a client that stops reading (its socket's buffers full) would
    hold its connection and the write for ever."""
    await asyncio.wait_for(response.write(data), WRITE_WAIT_S)


async def _event(response, obj):
    await _write(response, b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
