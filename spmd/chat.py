"""`python -m spmd.chat`: a terminal chat with a running spmd.serve (or any OpenAI-compatible server).

The answer streams as it comes; the conversation is kept and sent with every turn. Ctrl-C stops the answer (the
server frees its sequence) and keeps the program; Ctrl-D, /quit or /exit leaves; /reset forgets the conversation;
another /word alone is said to be no command, not sent.
Without --url, and with no server at the default address, it starts a one-rank spmd.serve for itself (said on
stderr) of --model where that is a file, else of the embedded model, and stops it at the end (also on Ctrl-C or
SIGTERM). A server still loading is waited for. Refused turns and errors are said on stderr; a chat whose input is
not a terminal ends 1 where a turn failed.
"""
from . import needs  # (first: one line, not a traceback, where this Python lacks the set-up)
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import click

from .errors import click_main
from .watch import first_rank, under_mpirun

DEFAULT_URL = "http://127.0.0.1:8080"
START_TIMEOUT_S = 300.0

COMMANDS = "/reset forgets the conversation, /quit leaves, Ctrl-C stops an answer"


# what an answer from a server that is not OpenAI-compatible raises as the client parses it
NOT_OPENAI = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def answer(client, model, messages, options, out):
    """Stream one answer to `out`; returns its text (what came before a Ctrl-C, which stops it), or None where the
    server refused the turn or its answer was not an OpenAI chat stream."""
    import openai
    parts, finish = [], None
    try:
        stream = client.chat.completions.create(model=model, messages=messages, stream=True, **options)
        try:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    out.write(parts[-1])
                    out.flush()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
        finally:
            stream.close()  # after a Ctrl-C: the server sees the client go and frees the sequence
    except KeyboardInterrupt:
        out.write(" [stopped]")
    except openai.APIError as e:
        hint = "(the turn was not kept; /reset starts a new conversation where it has grown too long)" \
            if getattr(e, "status_code", None) == 400 else None
        return failed(out, parts, getattr(e, "message", e), hint)
    except NOT_OPENAI as e:
        return failed(out, parts, f"the answer is not an OpenAI chat stream ({type(e).__name__}: {str(e)[:200]})")
    else:
        if finish is None:  # (a stream that ended without its last event, or a body that was no stream at all)
            return failed(out, parts, "the answer ended without a finish reason: the server stopped, or is not "
                                      "OpenAI-compatible")
    out.write("\n")
    if finish == "length":
        click.echo("(cut: --max-tokens, or the conversation fills the server's context)", err=True)
    return "".join(parts)


def failed(out, parts, why, hint=None):
    """A turn that failed: the answer's line ended where some of it came, why on stderr (and a hint); None."""
    out.write("\n" if parts else "")
    out.flush()
    click.echo(f"[error: {why}]", err=True)
    if hint:
        click.echo(hint, err=True)
    return None


def answers(url) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def wait_loaded(url, timeout_s=START_TIMEOUT_S):
    """Wait while the server's /health says it is loading (503: spmd.serve before its model is in); a server without
    /health, or any other answer, is taken as ready."""
    said, deadline = False, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=3):
                return
        except urllib.error.HTTPError as e:
            if e.code != 503:
                return
        except (OSError, ValueError):
            return
        if not said:
            click.echo(f"note: the server at {url} is loading its model: waiting", err=True)
            said = True
        time.sleep(0.5)
    raise click.ClickException(f"the server at {url} was still loading after {timeout_s:.0f} s")


class ServerLog:
    """The stderr lines of the server started for this chat, read by a thread of their own: `started` is set once
    it says its `address` (or ends); its errors are passed on where a turn fails (`tell_errors`), each once."""

    def __init__(self, stream):
        self.lines, self.told, self.started, self.address = [], 0, threading.Event(), None
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)
            found = re.search(r" on (http://\S+)", line) if self.address is None else None
            if found:
                self.address = found.group(1)
                self.started.set()
        self.started.set()

    def tell_errors(self):
        new = self.lines[self.told:]
        self.told += len(new)
        for line in new:
            if line.startswith("error:"):
                click.echo(f"(the server started for this chat said: {line.strip()})", err=True)


def start_local_server(model=None):
    """A one-rank spmd.serve of `model` (a GGUF file; None: the embedded model) on a free port: (its process, its
    URL, its ServerLog). Stopped again where it does not start, or where starting is interrupted."""
    proc = subprocess.Popen([sys.executable, "-m", "spmd.serve", "--port", "0", "--control-socket", "none",
                             *(["--model", model] if model else [])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    try:
        log = ServerLog(proc.stderr)
        log.started.wait(START_TIMEOUT_S)
        if log.address is None:
            raise click.ClickException("the local server did not start: " + "".join(log.lines[-3:]).strip())
        return proc, log.address, log
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc):
    """SIGTERM, then wait for it (it removes what it made); SIGKILL where it has not ended within a minute."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_url(url):
    """--url: http(s)://HOST[:PORT] with a port that is a number; a trailing /v1 (the base URL an OpenAI client
    takes) is taken off."""
    bad = click.BadParameter(f"{url!r} is not an http:// or https:// address (http://HOST:PORT)", param_hint="--url")
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise bad
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # (a ValueError where it is not a number)
    except ValueError:
        raise bad from None
    if not parts.hostname or port == 0:
        raise bad
    return re.sub(r"/v1/?$", "", url.rstrip("/"))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default=None, help=f"The server's address. Default: {DEFAULT_URL}, or, where nothing answers "
                                          "there, a server of the embedded model started for this chat.")
@click.option("--model", default=None, help="The model's id (default: the server's first).")
@click.option("--system", default=None, metavar="TEXT", help="A system message to start the conversation with.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2))
@click.option("--seed", default=None, type=int, help="Sampling seed (default: random).")
def cli(url, model, system, max_tokens, temperature, seed):
    """Chat with an spmd.serve server in the terminal."""
    if under_mpirun():
        if first_rank():
            click.echo("error: spmd.chat is a client of a server: run it without mpirun (python -m spmd.chat); the "
                       "ranks run python -m spmd.serve", err=True)
        sys.exit(2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # (the server started here stops too)
    local, log = None, None
    if url is not None:
        url = check_url(url)
    else:
        url = DEFAULT_URL
        if not answers(url):
            served = model if model and os.path.isfile(model) else None
            if model and served is None:
                raise click.ClickException(f"no server answers at {url}, and --model {model} is not a model file to "
                                           "start one of (give a server's --url, or a GGUF file)")
            click.echo(f"note: no server at {url}: starting one of {served or 'the embedded model'} (python -m "
                       "spmd.serve)", err=True)
            local, url, log = start_local_server(served)
            model = None  # (the id the server gives its file)
    try:
        failed = chat(url, model, system, max_tokens, temperature, seed, log)
    finally:
        if local is not None:
            stop_server(local)
            log.reader.join(5)  # (its last lines)
            log.tell_errors()
    if failed and not sys.stdin.isatty():
        sys.exit(1)


def chat(url, model, system, max_tokens, temperature, seed, server_log=None):
    """The conversation; returns whether a turn failed. server_log: the ServerLog of a server started for this
    chat."""
    import openai
    wait_loaded(url)
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        served = [m.id for m in client.models.list().data]  # (with --model too: is a server there at all?)
        if not all(isinstance(m, str) for m in served):
            raise TypeError("model ids that are not strings")
    except openai.APIStatusError as e:  # (a web server answered, with an error)
        raise click.ClickException(f"{url} is not an OpenAI-compatible server: GET /v1/models answered "
                                   f"{e.status_code}") from None
    except openai.APIError as e:
        raise click.ClickException(f"no server answers at {url} ({getattr(e, 'message', e)})") from None
    except NOT_OPENAI as e:
        raise click.ClickException(f"{url} is not an OpenAI-compatible server: its /v1/models answer is not a list "
                                   f"of models ({type(e).__name__}: {str(e)[:200]})") from None
    if not served and model is None:
        raise click.ClickException(f"the server at {url} lists no model: give --model")
    model = model or served[0]
    options = dict(max_tokens=max_tokens, temperature=temperature, **({"seed": seed} if seed is not None else {}))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive, failed = sys.stdin.isatty(), False
    sys.stdin.reconfigure(errors="surrogateescape")  # (bytes that are not UTF-8 read in any locale: below)
    if interactive:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
    click.echo(f"chatting with {model} at {url}; {COMMANDS}", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                click.echo("", err=True)
            break
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        # bytes that are not UTF-8 (a terminal or file in another encoding) become U+FFFD, not an error
        text = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = list(start)
            click.echo("(conversation forgotten)", err=True)
            continue
        if re.fullmatch(r"/[A-Za-z]+", text):  # a mistyped command, not a turn (a turn may start with a path: /usr ...)
            click.echo(f"(no command {text}: {COMMANDS})", err=True)
            continue
        messages.append({"role": "user", "content": text})
        reply = answer(client, model, messages, options, sys.stdout)
        if reply is None:
            messages.pop()  # a refused turn is not part of the conversation
            failed = True
            if server_log is not None:
                server_log.tell_errors()
        else:
            messages.append({"role": "assistant", "content": reply})
    return failed


def main():
    needs.interruptible()
    click_main(cli, "python -m spmd.chat")


if __name__ == "__main__":
    main()
