"""Train the small model that ships with spmd, spmd/embedded.gguf (used when --model is omitted), end to end.

Training text: the Python 3.11 documentation's reStructuredText sources, from Debian's `python3.11-doc` package,
under the PSF License Version 2 (which allows derivative works; the file says so in general.license and
general.description). Get them with

    cd /tmp && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc
    SOURCES=/tmp/pydoc/usr/share/doc/python3.11/html/_sources   # 497 .rst.txt files, 12 MB

scripts/embedded_corpus.py makes them prose (each section's title and paragraphs; code, tables and markup
dropped) and question/answer pairs (FAQ questions, glossary terms, documented functions and classes, modules and
section titles, each with its first paragraphs). A pair is rendered with the model's own chat template
(CHAT_TEMPLATE, the engine's built-in transcript: "User: ...\\nAssistant:") and ends in EOS, so a chat answer
stops by itself; a fifth of them open with a system message. Every example starts with BOS.

The stages, run from the repository root (each reads what the one before wrote under --work, /tmp/embed); these
are the commands that made the shipped file:

    python scripts/train_embedded.py corpus $SOURCES        # corpus.jsonl
    python scripts/train_embedded.py tokenizer              # tokenizer.model: sentencepiece BPE, 4096 pieces
    python scripts/train_embedded.py tokenize               # bench-out/embed/{train,val}.npy (uint16), tokenizer
    # on a CUDA machine (one H200), with bench-out/embed carried there:
    python3 scripts/train_embedded.py train --minutes 2 --out $OUT/mid
    python scripts/train_embedded.py export $OUT/mid/best --out spmd/embedded.gguf
    python scripts/train_embedded.py check spmd/embedded.gguf --probe $OUT/mid/probe.npz

`train` needs only numpy and torch; it saves the weights of the best validation loss (`best`) and of the last
step (`last`), each as two float16 .npz halves (the device returns files of at most 16 MiB), and `probe.npz`:
float32 logits of each on a fixed window, which `check --probe` compares with its own numpy forward pass (the RoPE
pairing, GQA grouping and tied classifier as the engine reads them). `check` then compares the engine's greedy
tokens, at 1 rank and at 3 (2:3:3), with that numpy pass on the file's own (dequantised) weights.

Figures of the shipped file:
- shape (SHAPE): dim 384, 8 layers, 6 heads of 64, 3 KV heads, FFN 960, context 512, tied embeddings, vocabulary
  4096; 13,965,696 parameters; matrices Q8_0, norms F32: 14,955,936 bytes (14.96 MB).
- text: 3056 prose chunks (5.1 MB) and 12141 question/answer pairs (2.9 MB); 2,100,559 training tokens, 43,483
  validation tokens (314 examples held out, one in VAL_EVERY by a hash of the text).
- training: 2 minutes on one H200 (about 23 steps/s), 2762 steps of 64 x 512 tokens (~43 passes over the text);
  AdamW (0.9, 0.95), learning rate 1.5e-3 after 200 warm-up steps, cosine over the time budget to 1.5e-4, weight
  decay 0.1 on matrices, dropout 0.1, bf16 autocast. Shipped: `best`, step 2250 (99 s): validation loss 2.280 (96
  windows of 512 tokens; the same on the Q8_0 file), training loss 0.268 on as many training windows (the Q8_0
  file, no dropout; 0.49 on the step's batch with dropout).
- other budgets tried: 1.5 minutes ended at validation 2.373; 5 minutes reached 2.35 after 1750 steps and rose to
  2.745 at the end (training 0.19): it recites the documentation more exactly but generalises worse.
"""
import argparse
import json
import math
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=3, ffn=960, vocab=4096, context=512, rope_theta=10000.0)
NORM_EPS = 1e-5
BOS, EOS = 1, 2
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
                 "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
                 "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")
SYSTEMS = ("You answer questions about Python.", "You are a helpful assistant.",
           "Answer from the Python documentation, briefly.")
PROBE = 32  # tokens of the probe window
VAL_EVERY = 50  # one example in this many (by a hash of its text) is held out for validation
DESCRIPTION = ("A small Llama-style model trained by spmd's scripts/train_embedded.py on the Python 3.11 "
               "documentation (Debian's python3.11-doc sources, Copyright Python Software Foundation, PSF License "
               "Version 2): prose and question/answer pairs made from it.")


# ---- corpus, tokenizer, tokens (this machine) ------------------------------------------------------------------
def stage_corpus(args):
    """SOURCES -> work/corpus.jsonl: {"text", "chat"} per example, chat ones rendered by CHAT_TEMPLATE."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    from embedded_corpus import examples
    from spmd.chat_template import ChatTemplate
    template = ChatTemplate(CHAT_TEMPLATE, bos_token="")
    prose, qa = examples(args.sources)
    rng = random.Random(0)
    rows = [{"text": t, "chat": False} for t in prose]
    for q, a in qa:
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.2 else []
        prompt = template.render(messages + [{"role": "user", "content": q}])
        rows.append({"text": prompt + " " + a, "chat": True})
    rng.shuffle(rows)
    args.work.mkdir(parents=True, exist_ok=True)
    with open(args.work / "corpus.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(prose)} prose chunks ({sum(map(len, prose)) / 1e6:.1f} MB), {len(qa)} pairs "
          f"({sum(len(q) + len(a) for q, a in qa) / 1e6:.1f} MB) -> {args.work / 'corpus.jsonl'}")


def _rows(work):
    with open(work / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stage_tokenizer(args):
    """work/corpus.jsonl -> work/tokenizer.model: BPE with byte fallback, ids 0-2 <unk> <s> </s>, no normalising."""
    import sentencepiece as spm
    lines = [line for row in _rows(args.work) for line in row["text"].split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(args.work / "tokenizer"), model_type="bpe",
        vocab_size=SHAPE["vocab"], byte_fallback=True, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    print(f"-> {args.work / 'tokenizer.model'}")


def stage_tokenize(args):
    """work/corpus.jsonl -> DATA/train.npy, DATA/val.npy: one uint16 stream each, BOS per example, EOS after an
    answer; DATA also gets this script and a copy of the tokenizer, all the train stage needs."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(args.work / "tokenizer.model"))
    streams = {"train": [], "val": []}
    for row in _rows(args.work):
        ids = [BOS] + sp.encode(row["text"]) + ([EOS] if row["chat"] else [])
        streams["val" if zlib.crc32(row["text"].encode()) % VAL_EVERY == 0 else "train"].append(ids)
    args.data.mkdir(parents=True, exist_ok=True)
    for name, chunks in streams.items():
        ids = np.fromiter((t for c in chunks for t in c), np.uint16)
        np.save(args.data / f"{name}.npy", ids)
        print(f"{name}: {len(chunks)} examples, {len(ids)} tokens")
    (args.data / "tokenizer.model").write_bytes((args.work / "tokenizer.model").read_bytes())


# ---- the model in torch (a CUDA machine) ---------------------------------------------------------------------
def make_model(torch, dropout):
    """The engine's llama: RMSNorm, RoPE on interleaved pairs (2i, 2i+1) with theta^(-2i/head_dim), GQA where
    query head h reads KV head h // group, SwiGLU, classifier tied to token_embd. Parameter names are GGUF's
    with "blocks." for "blk."."""
    nn, F = torch.nn, torch.nn.functional
    s = SHAPE
    hd = s["dim"] // s["n_heads"]
    group = s["n_heads"] // s["n_kv_heads"]

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(s["dim"]))

        def forward(self, x):
            x = x.float()
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight

    def rotate(x, cos, sin):
        """x (B, T, heads, hd) -> the same, pairs (2i, 2i+1) rotated by position * inv_freq[i]."""
        a, b = x[..., 0::2].float(), x[..., 1::2].float()
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d, kv, ffn = s["dim"], s["n_kv_heads"] * hd, s["ffn"]
            self.attn_norm, self.ffn_norm = RMSNorm(), RMSNorm()
            self.attn_q, self.attn_k = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False)
            self.attn_v, self.attn_output = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)
            self.ffn_gate, self.ffn_up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
            self.ffn_down = nn.Linear(ffn, d, bias=False)
            self.drop = nn.Dropout(dropout)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q = rotate(self.attn_q(h).view(B, T, -1, hd), cos, sin).transpose(1, 2)  # (B, heads, T, hd)
            k = rotate(self.attn_k(h).view(B, T, -1, hd), cos, sin).transpose(1, 2).repeat_interleave(group, 1)
            v = self.attn_v(h).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(group, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + self.drop(self.attn_output(a))
            h = self.ffn_norm(x)
            return x + self.drop(self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h)))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embd = nn.Embedding(s["vocab"], s["dim"])
            self.blocks = nn.ModuleList(Block() for _ in range(s["n_layers"]))
            self.output_norm = RMSNorm()
            inv = s["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
            angles = torch.outer(torch.arange(s["context"], dtype=torch.float64), inv)[:, None, :]  # (T, 1, hd/2)
            self.register_buffer("cos", angles.cos().float(), persistent=False)
            self.register_buffer("sin", angles.sin().float(), persistent=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:  # GPT-2's: N(0, 0.02), residual projections scaled down by depth
                    deep = name.endswith(("attn_output.weight", "ffn_down.weight"))
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * s["n_layers"]) if deep else 0.02)

        def forward(self, idx):
            """idx (B, T) -> logits (B, T, vocab)"""
            T = idx.shape[1]
            x = self.token_embd(idx)
            for blk in self.blocks:
                x = blk(x, self.cos[:T], self.sin[:T])
            return F.linear(self.output_norm(x), self.token_embd.weight)

    return Llama()


def gguf_name(name):
    return name.replace("blocks.", "blk.")


def save_checkpoint(torch, state, path):
    """{name: tensor} -> path-a.npz, path-b.npz, float16 with GGUF names (each half under 16 MiB)."""
    names = list(state)
    half = len(names) // 2
    for part, chosen in (("a", names[:half]), ("b", names[half:])):
        np.savez(f"{path}-{part}.npz", **{gguf_name(n): state[n].to(torch.float16).cpu().numpy() for n in chosen})


def load_checkpoint(path):
    """path-a.npz + path-b.npz -> {GGUF name: float32 array}."""
    out = {}
    for part in ("a", "b"):
        with np.load(f"{path}-{part}.npz") as z:
            out.update({k: z[k].astype(np.float32) for k in z.files})
    return out


def _batch(torch, ids, batch, T, gen):
    at = torch.randint(0, len(ids) - T - 1, (batch,), generator=gen, device=ids.device)
    rows = at[:, None] + torch.arange(T + 1, device=ids.device)[None, :]
    w = ids[rows]
    return w[:, :-1], w[:, 1:]


def _evaluate(torch, model, val, T, windows=96):
    F = torch.nn.functional
    starts = np.linspace(0, len(val) - T - 2, windows).astype(np.int64)
    rows = torch.as_tensor(starts, device=val.device)[:, None] + torch.arange(T + 1, device=val.device)[None, :]
    w = val[rows]
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        losses = [F.cross_entropy(model(w[i:i + 32, :-1]).float().flatten(0, 1), w[i:i + 32, 1:].flatten())
                  for i in range(0, windows, 32)]
    model.train()
    return float(torch.stack(losses).mean())


def stage_train(args):
    """DATA/{train,val}.npy -> OUT/{best,last}-{a,b}.npz, OUT/probe.npz, OUT/train.json; AdamW, bf16 autocast,
    cosine learning rate over the wall-clock budget."""
    import torch
    F = torch.nn.functional
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda"
    train_ids = torch.from_numpy(np.load(args.data / "train.npy").astype(np.int64)).to(dev)
    val_ids = torch.from_numpy(np.load(args.data / "val.npy").astype(np.int64)).to(dev)
    model = make_model(torch, args.dropout).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    T, budget, log = SHAPE["context"], args.minutes * 60, []
    best, best_state, step, start = float("inf"), None, 0, time.time()
    print(f"{n_params} parameters, {len(train_ids)} train / {len(val_ids)} val tokens", flush=True)
    while (elapsed := time.time() - start) < budget:
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = _batch(torch, train_ids, args.batch, T, gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.eval_every == 0:
            val = _evaluate(torch, model, val_ids, T)
            log.append(dict(step=step, seconds=round(time.time() - start, 1), lr=lr, train=loss.item(), val=val))
            print(json.dumps(log[-1]), flush=True)
            if val < best:
                best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
    final = dict(step=step, seconds=round(time.time() - start, 1), train=loss.item(),
                 val=_evaluate(torch, model, val_ids, T))
    print(json.dumps(final), flush=True)
    states = {"last": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    states["best"] = best_state or states["last"]  # copies: _probe loads each into the model
    probe = {}
    for name in args.save.split(","):
        save_checkpoint(torch, states[name], args.out / name)
        probe[name] = _probe(torch, model, states[name], val_ids[:PROBE])
    np.savez(args.out / "probe.npz", tokens=val_ids[:PROBE].cpu().numpy(), **probe)
    (args.out / "train.json").write_text(json.dumps(dict(params=n_params, best_val=best, final=final, log=log,
                                                         args={k: str(v) for k, v in vars(args).items()})))


def _probe(torch, model, state, tokens):
    """float32 logits (PROBE, vocab) of the float16-rounded weights on `tokens`, in eval mode, no TF32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model.load_state_dict({k: v.to(torch.float16).float() for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        return model(tokens[None])[0].float().cpu().numpy()


# ---- export and check (this machine) ---------------------------------------------------------------------------
def stage_export(args):
    """A checkpoint -> the GGUF: llama metadata, the sentencepiece vocabulary as llama.cpp's converter writes it,
    the chat template, matrices Q8_0 and norms F32, in llama.cpp's tensor order."""
    sys.path.insert(0, str(ROOT))
    import sentencepiece as spm
    from gguf import GGMLQuantizationType as T, GGUFWriter, LlamaFileType
    from spmd.quants import quantize
    from spmd.synth import Shape, tensor_plan
    shape = Shape(arch="llama", tied=True, **SHAPE)
    weights = load_checkpoint(args.checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(args.work / "tokenizer.model"))
    w = GGUFWriter(str(args.out), "llama")
    w.add_name("spmd-embedded-pydoc")
    w.add_description(DESCRIPTION)
    w.add_license("PSF-2.0")
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(2)
    for add, value in ((w.add_context_length, shape.context), (w.add_embedding_length, shape.dim),
                       (w.add_block_count, shape.n_layers), (w.add_feed_forward_length, shape.ffn),
                       (w.add_head_count, shape.n_heads), (w.add_head_count_kv, shape.n_kv_heads),
                       (w.add_layer_norm_rms_eps, NORM_EPS), (w.add_rope_freq_base, shape.rope_theta),
                       (w.add_rope_dimension_count, shape.head_dim), (w.add_vocab_size, shape.vocab)):
        add(value)
    _add_vocab(w, sp)
    w.add_chat_template(CHAT_TEMPLATE)
    for spec in tensor_plan(shape):
        data = weights[spec.name]
        if data.shape != spec.shape:
            raise SystemExit(f"{spec.name}: shape {data.shape} in the checkpoint, {spec.shape} expected")
        if data.ndim == 2:
            w.add_tensor(spec.name, quantize(data, T.Q8_0).data, raw_dtype=T.Q8_0)
        else:
            w.add_tensor(spec.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{shape.n_params} parameters -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


def _add_vocab(w, sp):
    from gguf import TokenType
    types = [TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
             else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL
             for i in range(sp.get_piece_size())]
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(sp.unk_id())
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)


def read_gguf(path):
    """{name: float32 array} of a GGUF through the gguf package's reader and dequantiser (not spmd's loader)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
            for t in GGUFReader(path).tensors}


def reference_logits(w, ids):
    """The numpy forward pass of the whole sequence: (len(ids), vocab) float64 logits, written out afresh from the
    llama definition (RoPE on pairs (2i, 2i+1), query head h on KV head h // group, tied classifier)."""
    s = SHAPE
    hd, group, n = s["dim"] // s["n_heads"], s["n_heads"] // s["n_kv_heads"], len(ids)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + NORM_EPS) * g

    inv = s["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None, None] * inv  # (n, 1, hd/2)

    def rope(x):  # (n, heads, hd)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
        return out

    x = w["token_embd.weight"][ids].astype(np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(s["n_layers"]):
        p = lambda name: w[f"blk.{i}.{name}.weight"]  # noqa: E731
        h = norm(x, p("attn_norm"))
        q, k, v = (h @ p("attn_q").T).reshape(n, -1, hd), (h @ p("attn_k").T).reshape(n, -1, hd), \
            (h @ p("attn_v").T).reshape(n, -1, hd)
        q, k = rope(q), rope(k)
        out = np.empty_like(q)
        for head in range(s["n_heads"]):
            sc = q[:, head] @ k[:, head // group].T / math.sqrt(hd) + mask
            e = np.exp(sc - sc.max(-1, keepdims=True))
            out[:, head] = (e / e.sum(-1, keepdims=True)) @ v[:, head // group]
        x = x + out.reshape(n, -1) @ p("attn_output").T
        h = norm(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


def greedy(w, ids, steps):
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(np.argmax(reference_logits(w, ids)[-1])))
        if ids[-1] == EOS:
            break
    return ids


def run_engine(gguf, prompt, steps, ranks=1, ratios=None):
    cmd = [sys.executable, "-m", "spmd.run", "--model", str(gguf), "--prompt", prompt, "--steps", str(steps),
           "--output", "json", "--control-socket", "none"] + (["--ratios", ratios] if ratios else [])
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


PROMPTS = ("The for statement", "A list comprehension", "User: How do I read a file?\nAssistant:",
           "User: What does str.split() do?\nAssistant:")  # the last one ends in EOS within 32 tokens


def stage_check(args):
    """The engine's greedy tokens against `greedy` on the file's own weights, at 1 rank and 3 (2:3:3); with
    --probe, the trained model's logits against `reference_logits` on the checkpoint."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(args.work / "tokenizer.model"))
    if args.probe:
        z = np.load(args.probe)
        for name in (k for k in z.files if k != "tokens"):
            ref = reference_logits(load_checkpoint(args.probe.parent / name), z["tokens"].astype(np.int64))
            print(f"probe {name}: max |torch - numpy| {np.abs(ref - z[name]).max():.2e} "
                  f"(logits up to {np.abs(ref).max():.1f})")
    w = read_gguf(args.gguf)
    ok = True
    for prompt in PROMPTS:
        ids = [BOS] + sp.encode(prompt)
        ref = greedy(w, ids, args.steps)[len(ids):]
        ref, eos = (ref[:-1], True) if ref[-1:] == [EOS] else (ref, False)  # the engine reports EOS as finish
        one = run_engine(args.gguf, prompt, args.steps)
        three = run_engine(args.gguf, prompt, args.steps, ranks=3, ratios="2:3:3")
        same = one["prompt_tokens"] == ids and all(r["tokens"] == ref and (r["finish"] == "eos") == eos
                                                   for r in (one, three))
        ok &= same
        print(f"{'same' if same else 'DIFFERENT'}: {prompt!r} -> {one['text']!r}{' EOS' if eos else ''}")
        if not same:
            print(f"  prompt {one['prompt_tokens']} / {ids}\n  1 rank {one['tokens']}\n  3 ranks {three['tokens']}"
                  f"\n  numpy  {ref}")
    raise SystemExit(0 if ok else 1)


# ---- command line ---------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/embed"), help="scratch folder of the local stages")
    p.add_argument("--data", type=Path, default=ROOT / "bench-out" / "embed", help="token files for training")
    sub = p.add_subparsers(dest="stage", required=True)
    sub.add_parser("corpus").add_argument("sources", type=Path, help="the .rst.txt tree (see the docstring)")
    sub.add_parser("tokenizer")
    sub.add_parser("tokenize")
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--minutes", type=float, default=5.0)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--save", default="best,last", help="which weights to save: best (validation loss), last")
    e = sub.add_parser("export")
    e.add_argument("checkpoint", type=Path, help="DIR/best or DIR/last: the -a/-b.npz pair train wrote")
    e.add_argument("--out", type=Path, default=ROOT / "spmd" / "embedded.gguf")
    c = sub.add_parser("check")
    c.add_argument("gguf", type=Path)
    c.add_argument("--steps", type=int, default=32)
    c.add_argument("--probe", type=Path, help="train's probe.npz, beside the best/last checkpoints")
    args = p.parse_args()
    if getattr(args, "out", None) is not None and args.stage == "train":
        args.out.mkdir(parents=True, exist_ok=True)
    globals()[f"stage_{args.stage}"](args)


if __name__ == "__main__":
    main()
