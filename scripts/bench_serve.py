"""Serving benchmark: time to first token and decode tokens/s per client at 1, 2 and 4 concurrent clients, for
spmd.serve and, in the same run on the same file, llama.cpp's llama-server where one is given (--llama-server).

Each client sends the same kind of request at once: a prompt of about --prompt-tokens tokens, --tokens to generate
(greedy, streamed). Time to first token is from the request to its first text chunk; tokens/s per client is its
completion tokens (the server's usage) after the first over the time from the first chunk to the last. The model is
the TinyLlama-1.1B shape in Q4_0 with random weights (spmd.synth) unless --model gives a file.

    python scripts/bench_serve.py [--ranks 1] [--threads 2] [--llama-server PATH/llama-server] [--out bench-out]

The peer is llama.cpp's own C++ server built natively, not llama-cpp-python's Python server. The newest sources a
package registry offers with the server are those vendored in the llama-cpp-python 0.3.2 sdist (llama.cpp of
November 2024; later sdists leave tools/server out):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.2 && tar xzf llama_cpp_python-0.3.2.tar.gz
    cd llama_cpp_python-0.3.2/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
        && cmake --build build -j 2 --target llama-server     # about 6 minutes on 2 cores
That server's /v1/completions stream is llama.cpp's own format ("content" chunks, "tokens_predicted"), which this
script reads as well as OpenAI's.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_decode import mpi_prefix  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, reader, lines, timeout=600):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            reader.join(5)  # (its last lines)
            said = "".join(lines[-5:]).strip()
            raise SystemExit(f"the server exited with {proc.returncode}" + (f":\n{said}" if said else ""))
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy")


def one_client(url, prompt, tokens, out, ignore_eos):
    """One streamed completion; reads OpenAI's chunks, or llama-server's own ("content") where it answers so."""
    body = {"prompt": prompt, "max_tokens": tokens, "n_predict": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = n = None
    chunks = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            now, event = time.perf_counter(), json.loads(line[6:])
            text = event["choices"][0]["text"] if event.get("choices") else event.get("content")
            if text:
                first, last, chunks = first or now, now, chunks + 1
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            elif "tokens_predicted" in event:
                n = event["tokens_predicted"]
    n = n if n is not None else chunks
    out.append({"ttft_s": first - t0 if first else None, "tokens": n,
                "tokens_per_s": (n - 1) / (last - first) if n and n > 1 and last > first else None})


def measure(url, prompt, tokens, concurrency, ignore_eos, rounds):
    one_client(url, prompt, 4, [], ignore_eos)  # warm-up
    rows = []
    for _ in range(rounds):
        out = []
        threads = [threading.Thread(target=one_client, args=(url, prompt, tokens, out, ignore_eos))
                   for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows += out
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    rate = [r["tokens_per_s"] for r in rows if r["tokens_per_s"] is not None]
    return {"clients": concurrency, "ttft_ms": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
            "tokens_per_s_per_client": round(statistics.median(rate), 2) if rate else None,
            "tokens_per_s_total": round(statistics.median(rate) * concurrency, 2) if rate else None,
            "completion_tokens": [r["tokens"] for r in rows]}


def serve(cmd, url, env=None):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    lines = []  # its stderr, read as it comes (a full pipe would stop it); its last lines say why it ended
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    wait_healthy(url, proc, reader, lines)
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--ratios", default=None)
    ap.add_argument("--threads", type=int, default=2, help="kernel threads per rank (llama-server: all ranks')")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--llama-server", default=None, metavar="PATH")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    from spmd.synth import TINYLLAMA, write_model
    model = args.model
    if model is None:
        model = str(ROOT / "bench-out" / "tinyllama-random-Q4_0.gguf")
        if not os.path.exists(model):
            os.makedirs(os.path.dirname(model), exist_ok=True)
            write_model(model, TINYLLAMA, qtype="Q4_0", seed=0)
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * (args.prompt_tokens // 9 + 1))
    clients = [int(c) for c in args.clients.split(",")]
    slots = max(clients)
    results = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "spmd.serve", "--model", model, "--port", str(port), "--threads", str(args.threads),
           "--sequences", str(slots), "--ctx-size", str(args.ctx)]
    if args.ratios:
        cmd += ["--ratios", args.ratios]
    if args.ranks > 1:
        cmd = [*mpi_prefix(args.ranks), *cmd]
    proc = serve(cmd, url)
    try:
        results["spmd"] = [measure(url, prompt, args.tokens, c, False, args.rounds) for c in clients]
    finally:
        stop(proc)
    if args.llama_server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = serve([args.llama_server, "-m", model, "--port", str(port), "-t", str(args.threads * args.ranks),
                      "-np", str(slots), "-c", str(args.ctx * slots)], url)
        try:
            results["llama-server"] = [measure(url, prompt, args.tokens, c, True, args.rounds) for c in clients]
        finally:
            stop(proc)
    print(f"model {os.path.basename(model)}, spmd {args.ranks} rank(s) x {args.threads} threads, {args.tokens} tokens")
    print(f"{'server':<14}{'clients':>8}{'TTFT ms':>10}{'tok/s/client':>14}{'tok/s total':>13}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:<14}{r['clients']:>8}{r['ttft_ms'] or '-':>10}{r['tokens_per_s_per_client'] or '-':>14}"
                  f"{r['tokens_per_s_total'] or '-':>13}")
    if "llama-server" in results:
        for a, b in zip(results["spmd"], results["llama-server"]):
            if a["tokens_per_s_total"] and b["tokens_per_s_total"]:
                rate = a["tokens_per_s_total"] / b["tokens_per_s_total"]
                ttft = f"{a['ttft_ms'] / b['ttft_ms']:.2f}" if a["ttft_ms"] and b["ttft_ms"] else "-"
                print(f"ratio spmd/llama-server at {a['clients']} clients: tok/s {rate:.2f}, TTFT {ttft}")
    else:
        print("(llama-server not run: give --llama-server PATH; this script's docstring says how to build it)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_serve.json"), "w") as f:
        json.dump({"model": model, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
