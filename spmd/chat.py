"""`python -m spmd.chat`: a terminal chat with a running spmd.serve (or any OpenAI-compatible server).

The answer streams as it comes; the conversation is kept and sent with every turn. Ctrl-C stops the answer (the
server frees its sequence) and keeps the program; Ctrl-D, /quit or /exit leaves; /reset forgets the conversation.
Without --url, and with no server at the default address, it starts a one-rank spmd.serve of the embedded model for
itself (said on stderr) and stops it at the end.
"""
from . import needs  # noqa: F401 (first: one line, not a traceback, where this Python lacks the set-up)
import re
import subprocess
import sys
import threading
import urllib.request

import click

from .errors import click_main

DEFAULT_URL = "http://127.0.0.1:8080"
START_TIMEOUT_S = 300.0

COMMANDS = "/reset forgets the conversation, /quit leaves, Ctrl-C stops an answer"


def answer(client, model, messages, options, out):
    """Stream one answer to `out`; returns its text (what came before a Ctrl-C, which stops it), or None where the
    server refused the turn."""
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
        out.write(f"\n[error: {getattr(e, 'message', e)}]\n")
        if getattr(e, "status_code", None) == 400:
            click.echo("(the turn was not kept; /reset starts a new conversation where it has grown too long)",
                       err=True)
        return None
    out.write("\n")
    if finish == "length":
        click.echo("(cut: --max-tokens, or the conversation fills the server's context)", err=True)
    return "".join(parts)


def answers(url) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def start_local_server():
    """A one-rank spmd.serve of the embedded model on a free port: (its process, its URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "spmd.serve", "--port", "0", "--control-socket", "none"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found, lines = threading.Event(), []

    def read():
        for line in proc.stderr:
            lines.append(line)
            if " on http://" in line:
                found.set()
        found.set()
    threading.Thread(target=read, daemon=True).start()
    found.wait(START_TIMEOUT_S)
    match = next((re.search(r"on (http://\S+)", s) for s in lines if " on http://" in s), None)
    if match is None:
        proc.kill()
        raise click.ClickException("the local server did not start: " + "".join(lines[-3:]).strip())
    return proc, match.group(1)


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
    local = None
    if url is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise click.BadParameter(f"{url!r} is not an http:// or https:// address (http://HOST:PORT)",
                                 param_hint="--url")
    if url is None:
        url = DEFAULT_URL
        if not answers(url):
            click.echo(f"note: no server at {url}: starting one of the embedded model (python -m spmd.serve)",
                       err=True)
            local, url = start_local_server()
    try:
        chat(url, model, system, max_tokens, temperature, seed)
    finally:
        if local is not None:
            local.terminate()
            local.wait(60)


def chat(url, model, system, max_tokens, temperature, seed):
    import openai
    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        served = [m.id for m in client.models.list().data]  # (with --model too: is a server there at all?)
    except openai.APIError as e:
        raise click.ClickException(f"no server answers at {url} ({getattr(e, 'message', e)})") from None
    if not served and model is None:
        raise click.ClickException(f"the server at {url} lists no model: give --model")
    model = model or served[0]
    options = dict(max_tokens=max_tokens, temperature=temperature, **({"seed": seed} if seed is not None else {}))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    click.echo(f"chatting with {model} at {url}; {COMMANDS}", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = list(start)
            click.echo("(conversation forgotten)", err=True)
            continue
        messages.append({"role": "user", "content": text})
        reply = answer(client, model, messages, options, sys.stdout)
        if reply is None:
            messages.pop()  # a refused turn is not part of the conversation
        else:
            messages.append({"role": "assistant", "content": reply})


def main():
    click_main(cli, "python -m spmd.chat")


if __name__ == "__main__":
    main()
