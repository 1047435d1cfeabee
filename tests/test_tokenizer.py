"""The tokenizer against sentencepiece, llama2.c's encode, and Hugging Face's byte-level BPE."""
import json
import random
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm

from spmd.errors import UserError
from spmd.gguf_file import GGUFFile
from spmd.tokenizer import (BYTE, BYTE_TO_CHAR, CONTROL, NORMAL, PRE_TOKENIZERS, UNKNOWN, UNUSED, USER_DEFINED,
                            load_tokenizer)

MODELS = Path(__file__).resolve().parents[2] / "shared/models"

SAMPLES = [
    "", "Hello world", "Once upon a time, there was a little girl named Lily.", " leading space",
    "trailing space ", "  two  spaces   three", " ", "   ", "line one\nline two\n\n", "\ttab\tand\r\n",
    "digits 0123456789 and 3.14159, 1,000,000", "punctuation!? (yes) [no] {maybe} ... -- ''\"\" #@$%^&*",
    "café naïve résumé Ångström", "日本語のテキスト 中文", "emoji 😀🎉 👩‍👩‍👧", "mixed: αβγ ДЖЗ עִבְרִית",
    "a<|user|>b <|user|> c", "<s> and </s> are only text here",
]


def write_gguf(path, model, tokens, types, **setters):
    """A minimal valid GGUF: one tiny tensor plus a vocabulary; `setters` name GGUFWriter methods to call."""
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if tokens:
        w.add_token_list(tokens)
        w.add_token_types(types)
    for method, value in setters.items():
        getattr(w, method)(value)
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def sp_vocab(sp):
    """A sentencepiece model's vocabulary as GGUF lists (tokens, types, scores)."""
    def kind(i):
        checks = ((sp.is_control, CONTROL), (sp.is_unknown, UNKNOWN), (sp.is_byte, BYTE), (sp.is_unused, UNUSED))
        return next((k for check, k in checks if check(i)), NORMAL)
    n = sp.get_piece_size()
    return [sp.id_to_piece(i) for i in range(n)], [kind(i) for i in range(n)], [sp.get_score(i) for i in range(n)]


def sp_gguf(path, sp, user_defined=()):
    tokens, types, scores = sp_vocab(sp)
    for piece in user_defined:  # the Python API cannot tell user-defined pieces from normal ones
        types[sp.piece_to_id(piece)] = USER_DEFINED
    return write_gguf(path, "llama", tokens, types, add_token_scores=scores, add_bos_token_id=sp.bos_id(),
                      add_eos_token_id=sp.eos_id(), add_unk_token_id=sp.unk_id())


def corpus(n_lines=1500):
    words = ("the a little girl boy cat dog sat on mat ran to park and saw big red ball happy sad sun moon tree "
             "once upon time there was named lily tom she he it they played with friends every day, . ! ? 12 7 "
             "365 2024 café résumé").split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small sentencepiece BPE model with byte fallback, Llama 2's normalisation, and one user-defined piece."""
    prefix = tmp_path_factory.mktemp("sp") / "bpe"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(prefix), model_type="bpe", vocab_size=500,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, user_defined_symbols=["<|user|>"], num_threads=1,
        minloglevel=2)
    model = Path(f"{prefix}.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return model, sp, sp_gguf(model.with_suffix(".gguf"), sp, user_defined=["<|user|>"])


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    path = MODELS / "llama2-tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return path, sp, sp_gguf(tmp_path_factory.mktemp("llama2") / "vocab.gguf", sp)


def streamed(tok, ids):
    stream = tok.stream()
    return "".join(stream.push(i) for i in ids) + stream.flush()


def check_against_sentencepiece(tok, sp, texts):
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_bos=False) == ids, text
        assert tok.encode(text) == [sp.bos_id()] + ids
        assert tok.decode(ids) == sp.decode(ids) == text
        assert tok.decode([sp.bos_id()] + ids + [sp.eos_id()]) == text
        assert streamed(tok, ids) == text


# ---- llama (sentencepiece-style) ----------------------------------------------------------------------------
def test_trained_bpe_gguf_matches_sentencepiece(trained):
    _, sp, gguf_file = trained
    tok = load_tokenizer(gguf_file)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, {2}, True, sp.get_piece_size())
    check_against_sentencepiece(tok, sp, SAMPLES + corpus(40))


def test_trained_bpe_model_file_wraps_sentencepiece(trained):
    model, sp, gguf_file = trained
    tok = load_tokenizer(gguf_file, sp_model_path=model)  # the .model wins
    check_against_sentencepiece(tok, sp, SAMPLES)


def test_decode_drops_only_the_first_visible_space_like_sentencepiece(trained):
    _, sp, gguf_file = trained
    tok = load_tokenizer(gguf_file)
    p = sp.piece_to_id
    for ids in ([p("▁"), p("▁"), p("▁the")], [1, p("▁the")], [p("<0x20>"), p("▁the")], [0, p("▁the")],
                [p("<0xE4>"), p("▁the")], [p("the"), p("▁the")]):
        assert tok.decode(ids) == sp.decode(ids) == streamed(tok, ids), ids


def test_stream_holds_back_partial_utf8(trained):
    _, sp, gguf_file = trained
    tok = load_tokenizer(gguf_file)
    ids = tok.encode("中😀", add_bos=False)
    assert len(ids) == 1 + 3 + 4  # "▁" then byte fallback
    stream = tok.stream()
    assert [stream.push(i) for i in ids] == ["", "", "", "中", "", "", "", "😀"]
    assert stream.flush() == ""
    stream = tok.stream()
    assert stream.push(ids[1]) == "" and stream.flush() == "\ufffd"  # a truncated character


def test_llama2_gguf_matches_sentencepiece(llama2):
    _, sp, gguf_file = llama2
    tok = load_tokenizer(gguf_file)
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_ids == {2}
    check_against_sentencepiece(tok, sp, SAMPLES + corpus(40))


def test_llama2_long_prompt_is_fast_and_exact(llama2):
    _, sp, gguf_file = llama2
    tok = load_tokenizer(gguf_file)
    prompt = (" ".join(corpus(60)) + " 日本語 😀\n")[:2000]
    start = time.perf_counter()
    ids = tok.encode(prompt)
    elapsed = time.perf_counter() - start
    assert ids == [1] + sp.encode(prompt)
    assert elapsed < 0.25, f"{elapsed:.3f} s for 2,000 characters"


def test_llama2_model_file(llama2):
    path, sp, _ = llama2
    check_against_sentencepiece(load_tokenizer(sp_model_path=path), sp, SAMPLES)


# ---- llama2.c's tok512.bin ----------------------------------------------------------------------------------
def read_llama2c_vocab(path):
    data = path.read_bytes()
    vocab, scores, off = [], [], 4  # skip max_token_length
    while off < len(data):
        score, length = struct.unpack_from("<fi", data, off)
        vocab.append(data[off + 8: off + 8 + length].decode())
        scores.append(score)
        off += 8 + length
    return vocab, scores


def llama2c_encode(vocab, scores, text):
    """A direct transcription of llama2.c's encode(): " " prefix, code points (else bytes + 3), best-score merges."""
    lookup = {}
    for i, s in enumerate(vocab):
        lookup.setdefault(s, i)
    tokens = [lookup[" "]] if text else []
    for ch in text:
        tokens += [lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode()]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            j = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]], -1)
            if j != -1 and scores[j] > best_score:
                best_score, best_id, best_idx = scores[j], j, i
        if best_idx == -1:
            return tokens
        tokens[best_idx: best_idx + 2] = [best_id]


def test_tok512_matches_llama2c(tmp_path):
    path = MODELS / "tok512.bin"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    vocab, scores = read_llama2c_vocab(path)
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(vocab) - 259)
    tokens = [s.replace(" ", "▁") for s in vocab]
    tok = load_tokenizer(write_gguf(tmp_path / "tok512.gguf", "llama", tokens, types, add_token_scores=scores,
                                    add_bos_token_id=1, add_eos_token_id=2, add_unk_token_id=0))
    for text in ["Once upon a time", "Once upon a time, there was a little girl named Lily.",
                 "The cat sat on the mat.\nIt was happy!", "", "  two  spaces", "héllo wörld 😀 日本"]:
        ids = tok.encode(text)
        assert ids == [1] + llama2c_encode(vocab, scores, text), text
        assert tok.decode(ids) == text


# ---- gpt2 (byte-level BPE) ----------------------------------------------------------------------------------
TINY_MERGES = ["Ġ t", "h e", "l l", "Ġt he", "he ll", "Ġ hell", "Ġhell o"]
TINY_SPECIALS = {"<|begin_of_text|>": CONTROL, "<|im_start|>": USER_DEFINED}


def gpt2_gguf(path, pre, tokens, merges, types, **setters):
    return write_gguf(path, "gpt2", tokens, types, add_token_merges=merges, add_tokenizer_pre=pre, **setters)


def tiny_gpt2(path, pre="llama-bpe", **setters):
    """All 256 byte characters, the merge results, one word with no merge path, and two special tokens."""
    tokens = list(BYTE_TO_CHAR.values()) + [m.replace(" ", "") for m in TINY_MERGES] + ["Ġworld"]
    tokens += list(TINY_SPECIALS)
    types = [NORMAL] * (len(tokens) - 2) + list(TINY_SPECIALS.values())
    bos = tokens.index("<|begin_of_text|>")
    return load_tokenizer(gpt2_gguf(path, pre, tokens, TINY_MERGES, types, add_bos_token_id=bos,
                                    add_eos_token_id=bos, add_eot_token_id=bos + 1, **setters)), tokens


@pytest.mark.parametrize("pre, said, adds", [("llama-bpe", None, True), ("llama3", None, True),
                                             ("qwen2", None, False), ("default", None, False),
                                             ("llama-bpe", False, False), ("qwen2", True, True)])
def test_gpt2_bos_follows_the_file_else_llama_cpps_default(tmp_path, pre, said, adds):
    """tokenizer.ggml.add_bos_token where the file has it; else llama.cpp's default for the pre-tokenizer: Llama 3's
    (llama3, llama-v3, llama-bpe) add BOS, the others do not."""
    setters = {} if said is None else {"add_add_bos_token": said}
    tok, tokens = tiny_gpt2(tmp_path / "t.gguf", pre=pre, **setters)
    assert tok.add_bos is adds
    assert (tok.encode("hello")[0] == tokens.index("<|begin_of_text|>")) is adds


def test_gpt2_hand_derived(tmp_path):
    tok, tokens = tiny_gpt2(tmp_path / "tiny.gguf", add_add_bos_token=False)
    assert tok.add_bos is False and tok.bos_id == tokens.index("<|begin_of_text|>")
    assert tok.eos_ids == {tok.bos_id, tok.bos_id + 1}

    def ids(*pieces):
        return [tokens.index(p) for p in pieces]
    assert tok.encode("hello the hello") == ids("hell", "o", "Ġthe", "Ġhello")
    assert tok.encode("hello", add_bos=True) == ids("<|begin_of_text|>", "hell", "o")
    assert tok.encode(" world") == ids("Ġworld")  # llama-bpe takes a whole pre-token found in the vocabulary
    assert tok.encode("it's 12345\n\n") == ids("i", "t", "'", "s", "Ġ", "1", "2", "3", "4", "5", "Ċ", "Ċ")
    assert tok.encode("é") == ids(BYTE_TO_CHAR[0xC3], BYTE_TO_CHAR[0xA9])
    assert tok.encode("<|im_start|>the<|begin_of_text|>") == ids("<|im_start|>", "t", "he", "<|begin_of_text|>")
    assert tok.decode(tok.encode("<|begin_of_text|>the<|im_start|>")) == "the<|im_start|>"  # control is silent
    qwen, _ = tiny_gpt2(tmp_path / "qwen.gguf", pre="qwen2")
    assert qwen.encode(" world") == ids("Ġ", "w", "o", "r", "l", "d")
    assert qwen.encode(" hello") == ids("Ġhello")  # reached through merges alone
    assert qwen.encode("12345") == ids("1", "2", "3", "4", "5")


def test_gpt2_round_trips_arbitrary_unicode(tmp_path):
    tok, _ = tiny_gpt2(tmp_path / "tiny.gguf", add_add_bos_token=False)
    rng = random.Random(0)
    alphabet = [chr(c) for r in ((0, 0x250), (0x370, 0x530), (0x3040, 0x30FF), (0x4E00, 0x4F00),
                                 (0x1F300, 0x1F64F)) for c in range(*r)] + list(" \n\t'") * 40
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text)
        assert tok.decode(ids) == streamed(tok, ids) == text


def hf_byte_level_bpe(pre_regex, ignore_merges):
    """Hugging Face's byte-level BPE, set up as Llama 3's tokenizer.json is, trained on the test corpus."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pre_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=list(TINY_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(corpus() + SAMPLES * 3, trainer)
    return hf


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_gpt2_matches_hugging_face(tmp_path, pre):
    hf = hf_byte_level_bpe(*PRE_TOKENIZERS[pre])
    model = json.loads(hf.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [TINY_SPECIALS.get(t, NORMAL) for t in tokens]
    tok = load_tokenizer(gpt2_gguf(tmp_path / "hf.gguf", pre, tokens, merges, types))
    for text in SAMPLES + corpus(30) + ["<|im_start|>user\nhi<|begin_of_text|>", "I'LL it's WE'VE 1234567"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids, text
        assert tok.decode(ids) == text.replace("<|begin_of_text|>", "")


# ---- errors -------------------------------------------------------------------------------------------------
def test_unsupported_tokenizer_model(tmp_path):
    gguf_file = write_gguf(tmp_path / "rwkv.gguf", "rwkv", ["a", "b"], [NORMAL, NORMAL])
    with pytest.raises(UserError, match="'rwkv' is not supported"):
        load_tokenizer(gguf_file)


def test_missing_vocabulary(tmp_path):
    with pytest.raises(UserError, match="no tokenizer vocabulary"):
        load_tokenizer(write_gguf(tmp_path / "none.gguf", None, [], []))
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer()


def test_unknown_pre_tokenizer(tmp_path):
    tokens = list(BYTE_TO_CHAR.values()) + ["Ġt"]
    with pytest.raises(UserError, match="'mystery' is not supported"):
        load_tokenizer(gpt2_gguf(tmp_path / "pre.gguf", "mystery", tokens, ["Ġ t"], [NORMAL] * len(tokens)))


def test_unreadable_model_file(tmp_path):
    with pytest.raises(UserError, match="tokenizer model not found: .*absent.model"):
        load_tokenizer(sp_model_path=tmp_path / "absent.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="bad.model: not a valid sentencepiece model"):
        load_tokenizer(sp_model_path=bad)
    bad.write_bytes(b"")
    with pytest.raises(UserError, match="the file is empty"):
        load_tokenizer(sp_model_path=bad)


@pytest.mark.parametrize("meta, message", [
    ({"tokenizer.ggml.model": ["llama"], "tokenizer.ggml.tokens": ["a"]}, "tokenizer model .* is not supported"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [1, 2]}, "must be a list of strings"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1]},
     "token_type must be a type from 0 to 6 for each of the 2 tokens"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.token_type": ["x"]},
     "token_type must be a type from 0 to 6"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.token_type": [999]},
     "token_type must be a type from 0 to 6"),  # (it ran on, its text wrong)
])
def test_a_vocabulary_of_the_wrong_types_is_one_line(meta, message):
    """Metadata as a damaged or hand-made file may hold it: values of the wrong types are refused by name."""
    from types import SimpleNamespace

    from spmd.tokenizer import from_gguf
    gguf = SimpleNamespace(path="x.gguf", meta=lambda key, default=None: meta.get(key, default))
    with pytest.raises(UserError, match=message):
        from_gguf(gguf)


def test_gpt2s_byte_map_read_and_written_alike():
    """The reader's byte map and the test-file writer's (written apart) agree, with GPT-2's known stand-ins:
    a space is U+0120 (Ġ), a newline U+010A (Ċ), printable ASCII itself."""
    from spmd import synth, tokenizer
    read, written = tokenizer.bytes_to_unicode(), synth.bytes_to_unicode()
    assert read == written and len(set(read.values())) == 256
    assert read[32] == "\u0120" and read[10] == "\u010a" and read[ord("a")] == "a" and read[0] == "\u0100"


def test_a_text_is_refused_by_its_bytes_only_where_no_token_could_hold_more():
    """bytes_beyond (a prompt refused before it is tokenized): with byte fallback no token stands for more than
    the longest piece's bytes; without it a run of unknown characters becomes one <unk>, of any length, and a long
    text may still fit (it was refused)."""
    from types import SimpleNamespace

    from spmd.run import EMBEDDED_MODEL
    from spmd.gguf_file import GGUFFile
    from spmd.tokenizer import from_gguf, load_tokenizer
    f = GGUFFile(EMBEDDED_MODEL)
    with_bytes = load_tokenizer(f)
    f.close()
    assert not with_bytes.folds
    long = "x" * (10 * with_bytes.longest_piece + 1)
    assert with_bytes.bytes_beyond(long, 10) == len(long) and with_bytes.bytes_beyond(long[:-1], 10) is None
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "\u2581a"],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 1]}
    folding = from_gguf(SimpleNamespace(path="x.gguf", meta=lambda key, default=None: meta.get(key, default)))
    assert folding.folds and folding.bytes_beyond("\u6f22" * 10000, 4) is None
    assert len(folding.encode("\u6f22" * 10000)) <= 3  # (BOS, and the run of unknowns as one <unk>)
