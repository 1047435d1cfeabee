"""Text <-> token ids, on rank 0 only: from a GGUF file's vocabulary, or from a sentencepiece .model.

Two GGUF vocabularies are understood:
  llama  sentencepiece-style BPE (Llama 2, Mistral, llama2.c exports): merge adjacent pieces by score, with byte
         fallback; equal to sentencepiece's own `encode` on the same vocabulary.
  gpt2   byte-level BPE (Llama 3, Qwen2): pre-tokenize with the model's regex, then merge by rank.
Decoding is one table for both: the bytes each id stands for (and, for llama, the same with the leading space that
the encoder's prefix added dropped, for the first visible token). A .model file is wrapped, not re-implemented.
"""
import codecs
import heapq
import re

import regex
import sentencepiece as spm

from .errors import UserError, regular_file

MAX_TOKENIZER_BYTES = 64 * 2**20  # a sentencepiece model is a few MB

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type
SPACE = "\u2581"  # sentencepiece's visible space, "▁"
UNK_TEXT = " \u2047 "  # how sentencepiece decodes <unk>

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# tokenizer.ggml.pre -> (pre-tokenizer regex, whether a pre-token that is itself in the vocabulary skips merging)
PRE_TOKENIZERS = {
    "default": (_GPT2, False), "gpt-2": (_GPT2, False),
    "llama3": (_LLAMA3, True), "llama-v3": (_LLAMA3, True), "llama-bpe": (_LLAMA3, True),
    "qwen2": (_QWEN2, False), "deepseek-r1-qwen": (_QWEN2, False),
}

# where the file has no tokenizer.ggml.add_bos_token, these pre-tokenizers' prompts start with BOS (llama.cpp's
# defaults: Llama 3's, as its tokenizer adds <|begin_of_text|>; the other gpt2 vocabularies add none)
BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe")


class StreamDecoder:
    """Decodes generated ids one at a time, holding back the bytes of a UTF-8 character until it is complete."""

    def __init__(self, pieces, first_pieces):
        self._pieces = pieces
        self._first_pieces = first_pieces
        self._at_start = True  # no visible token yet: the next one drops the space the encoder's prefix added
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece = (self._first_pieces if self._at_start else self._pieces)[token_id]
        self._at_start = self._at_start and not self._pieces[token_id]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Encodes through a model-specific function; decodes through a table of the bytes of each id."""

    def __init__(self, encode_fn, pieces, first_pieces, bos_id, eos_ids, add_bos, controls=None, folds=False):
        self._encode = encode_fn  # str -> list[int], without BOS
        self._pieces = pieces  # id -> bytes it decodes to (b"" for control tokens)
        self._first_pieces = first_pieces  # the same, for the first visible token of a sequence
        self.bos_id = bos_id
        self.eos_ids = set(eos_ids)
        self.add_bos = add_bos
        self.vocab_size = len(pieces)
        self.controls = dict(controls or {})  # control tokens' texts ("<s>", "<|im_start|>") -> ids
        self.longest_piece = max([len(p) for p in pieces] + [len(t) for t in self.controls] + [1])  # bytes
        self.folds = folds  # whether a run of unknown characters, of any length, may become one <unk>
        self._split_controls = _splitter(self.controls)

    def bytes_beyond(self, text: str, positions: int) -> int | None:
        """The bytes of `text` where no way of tokenizing it fits `positions` (no token stands for more than the
        longest piece's bytes, unless unknowns fold), else None: cheap, so that megabytes need not be tokenized to be
        refused."""
        if self.folds or len(text) <= positions * self.longest_piece:  # (characters <= bytes)
            return None
        n = len(text.encode("utf-8", "replace"))
        return n if n > positions * self.longest_piece else None

    def encode(self, text: str, add_bos: bool | None = None, controls: bool = False) -> list[int]:
        """The ids of `text`, BOS first where the model adds it. With `controls` (a chat template's output) the
        texts of control tokens become those tokens, the rest between them is encoded as text, and BOS is not
        added twice."""
        if controls and self.controls:
            ids = []
            for k, chunk in enumerate(self._split_controls.split(text)):
                ids += [self.controls[chunk]] if k % 2 else self._encode(chunk) if chunk else []
        else:
            ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None \
                and not (controls and ids[:1] == [self.bos_id]):
            ids = [self.bos_id] + ids
        return ids

    def piece_text(self, token_id) -> str:
        """The text a token stands for, as a chat template names it ("<s>" for BOS), or "" for none."""
        for text, i in self.controls.items():
            if i == token_id:
                return text
        return "" if token_id is None else self._pieces[token_id].decode("utf-8", "replace")

    def decode(self, ids: list[int]) -> str:
        stream = self.stream()
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self._pieces, self._first_pieces)


# ---- shared pieces ------------------------------------------------------------------------------------------
def merge_pairs(symbols: list[str], priority) -> list[str]:
    """Repeatedly merge the adjacent pair with the lowest `priority(left, right)` (leftmost on ties; None: never).

    A heap of candidate pairs over a linked list of symbols, so a long text costs O(n log n).
    """
    n = len(symbols)
    symbols = list(symbols)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []

    def consider(i):
        if i >= 0 and nxt[i] < n:
            p = priority(symbols[i], symbols[nxt[i]])
            if p is not None:
                heapq.heappush(heap, (p, i, symbols[i], symbols[nxt[i]]))

    for i in range(n - 1):
        consider(i)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if symbols[i] != left or j >= n or symbols[j] != right:
            continue  # stale: one side has been merged since
        symbols[i], symbols[j] = left + right, ""
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        consider(prv[i])
        consider(i)
    return [s for s in symbols if s]


def _splitter(literals):
    """A regex whose split() cuts text around any of `literals` (longest first), keeping them at odd indices."""
    alternatives = [re.escape(s) for s in sorted(literals, key=len, reverse=True)] or ["(?!)"]
    return re.compile("(" + "|".join(alternatives) + ")")


def _decode_tables(tokens, types, piece_bytes, drop_first_space):
    pieces = [piece_bytes(t, k) for t, k in zip(tokens, types)]
    if not drop_first_space:
        return pieces, pieces
    first = [p[1:] if k in (NORMAL, USER_DEFINED, UNUSED) and t.startswith(SPACE) else p
             for p, t, k in zip(pieces, tokens, types)]
    return pieces, first


# ---- llama: sentencepiece-style BPE -------------------------------------------------------------------------
def _llama_piece(token, kind) -> bytes:
    if kind == CONTROL:
        return b""
    if kind == UNKNOWN:
        return UNK_TEXT.encode()
    if kind == BYTE:
        return bytes([byte_value(token)])  # "<0x0A>"
    return token.replace(SPACE, " ").encode()


def byte_value(piece) -> int:
    """The byte of a byte token "<0xHH>"."""
    if not (isinstance(piece, str) and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece)):
        raise UserError(f"the vocabulary's byte token {piece!r:.40} is not <0xHH>")
    return int(piece[3:-1], 16)


class SpmEncoder:
    """sentencepiece's BPE encode: "▁" for spaces (and a "▁" prefix), characters merged by the score of the result."""

    def __init__(self, tokens, types, scores, unk_id, add_space_prefix):
        self._scores = {t: s for t, s, k in zip(tokens, scores, types) if k == NORMAL}
        self._ids = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (NORMAL, USER_DEFINED)}
        self._user_defined = {t for t, k in zip(tokens, types) if k == USER_DEFINED}
        self._split_user_defined = _splitter(self._user_defined)
        byte_ids = {byte_value(t): i for i, (t, k) in enumerate(zip(tokens, types)) if k == BYTE}
        self._byte_ids = byte_ids if len(byte_ids) == 256 else None  # byte fallback needs all 256
        self.folds = self._byte_ids is None  # (then unknown characters become <unk>, a run of them one)
        self._unk_id = unk_id
        self._prefix = SPACE if add_space_prefix else ""

    def _priority(self, left, right):
        """Highest score first; user-defined pieces stay whole, as sentencepiece freezes them."""
        if left in self._user_defined or right in self._user_defined:
            return None
        score = self._scores.get(left + right)
        return None if score is None else -score

    def __call__(self, text: str) -> list[int]:
        if not text:
            return []
        symbols = []
        for k, chunk in enumerate(self._split_user_defined.split(self._prefix + text.replace(" ", SPACE))):
            symbols += [chunk] if k % 2 else list(chunk)
        ids = []
        for symbol in merge_pairs(symbols, self._priority):
            if symbol in self._ids:
                ids.append(self._ids[symbol])
            elif self._byte_ids:
                ids += [self._byte_ids[b] for b in symbol.encode()]
            elif not ids or ids[-1] != self._unk_id:  # sentencepiece folds a run of unknowns into one <unk>
                ids.append(self._unk_id)
        return ids


def _llama_from_gguf(gguf, tokens, types) -> Tokenizer:
    unk_id = _token_id(gguf, "unknown_token_id", len(tokens))
    unk_id = next((i for i, k in enumerate(types) if k == UNKNOWN), 0) if unk_id is None else unk_id
    add_space_prefix = gguf.meta("tokenizer.ggml.add_space_prefix", True)
    scores = gguf.meta("tokenizer.ggml.scores")
    if scores is None:
        scores = [0.0] * len(tokens)
    elif not (isinstance(scores, list) and len(scores) == len(tokens)
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)):
        raise UserError(f"{gguf.path}: tokenizer.ggml.scores must be a number for each of the {len(tokens)} tokens")
    encoder = SpmEncoder(tokens, types, scores, unk_id, add_space_prefix)
    pieces, first = _decode_tables(tokens, types, _llama_piece, add_space_prefix)
    return Tokenizer(encoder, pieces, first, _token_id(gguf, "bos_token_id", len(tokens)), _eos_ids(gguf, len(tokens)),
                     gguf.meta("tokenizer.ggml.add_bos_token", True), _controls(tokens, types),
                     folds=encoder.folds)


# ---- gpt2: byte-level BPE -----------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes are themselves, the rest U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _gpt2_piece(token, kind) -> bytes:
    if kind == CONTROL:
        return b""
    if kind == UNKNOWN:
        return UNK_TEXT.encode()
    if kind == USER_DEFINED:
        return token.encode()
    return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode() for c in token)


class BpeEncoder:
    """Byte-level BPE: special tokens matched whole, the rest pre-tokenized by regex and merged by rank."""

    def __init__(self, tokens, types, merges, pre):
        self._ids = {t: i for i, t in enumerate(tokens)}
        pairs = (m.split(" ", 1) for m in merges)
        self._ranks = {(a, b): r for r, (a, b) in enumerate(pairs) if a + b in self._ids}
        specials = [t for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED) and t]
        self._split_specials = _splitter(specials)
        pattern, self._whole_words = PRE_TOKENIZERS[pre]
        self._pre = regex.compile(pattern)

    def _word(self, word: str) -> list[int]:
        chars = "".join(BYTE_TO_CHAR[b] for b in word.encode())
        if self._whole_words and chars in self._ids:
            return [self._ids[chars]]
        return [self._ids[p] for p in merge_pairs(list(chars), lambda a, b: self._ranks.get((a, b)))]

    def __call__(self, text: str) -> list[int]:
        ids = []
        for k, chunk in enumerate(self._split_specials.split(text)):
            if k % 2:
                ids.append(self._ids[chunk])
            else:
                for word in self._pre.findall(chunk):
                    ids += self._word(word)
        return ids


def _gpt2_from_gguf(gguf, tokens, types) -> Tokenizer:
    merges = gguf.meta("tokenizer.ggml.merges")
    if not merges:
        raise UserError(f"{gguf.path} has a gpt2 vocabulary but no tokenizer.ggml.merges")
    missing = set(BYTE_TO_CHAR.values()) - set(tokens)
    if missing:
        raise UserError(f"{gguf.path}: the gpt2 vocabulary lacks {len(missing)} of the 256 byte tokens")
    pre = gguf.meta("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{gguf.path}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                        f"(known: {', '.join(PRE_TOKENIZERS)})")
    pieces, first = _decode_tables(tokens, types, _gpt2_piece, drop_first_space=False)
    return Tokenizer(BpeEncoder(tokens, types, merges, pre), pieces, first,
                     _token_id(gguf, "bos_token_id", len(tokens)), _eos_ids(gguf, len(tokens)),
                     gguf.meta("tokenizer.ggml.add_bos_token", pre in BOS_BY_DEFAULT), _controls(tokens, types))


def _controls(tokens, types) -> dict:
    """Control tokens' texts -> ids (the first id where two share a text)."""
    out = {}
    for i, (t, k) in enumerate(zip(tokens, types)):
        if k == CONTROL and t:
            out.setdefault(t, i)
    return out


# ---- entry points -------------------------------------------------------------------------------------------
def _eos_ids(gguf, n) -> set[int]:
    """The ids that end a sequence (each below n, the vocabulary's size)."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    return {v for v in (_token_id(gguf, k, n) for k in keys) if v is not None}


def _token_id(gguf, key, n):
    """tokenizer.ggml.KEY: a token id below n, or None where the file has none."""
    v = gguf.meta(f"tokenizer.ggml.{key}")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n):
        raise UserError(f"{gguf.path}: tokenizer.ggml.{key} must be a token id in 0..{n - 1}, not {v!r:.40}")
    return v


_FROM_GGUF = {"llama": _llama_from_gguf, "gpt2": _gpt2_from_gguf}


def from_gguf(gguf) -> Tokenizer:
    """The tokenizer described by a GGUFFile's tokenizer.ggml.* metadata."""
    model = gguf.meta("tokenizer.ggml.model")
    tokens = gguf.meta("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise UserError(f"{gguf.path} holds no tokenizer vocabulary; give a sentencepiece .model file instead")
    if not isinstance(model, str) or model not in _FROM_GGUF:
        raise UserError(f"{gguf.path}: tokenizer model {model!r:.40} is not supported (only 'llama' and 'gpt2')")
    types = gguf.meta("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{gguf.path}: tokenizer.ggml.tokens must be a list of strings")
    if not (isinstance(types, list) and len(types) == len(tokens)
            and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= BYTE for k in types)):
        raise UserError(f"{gguf.path}: tokenizer.ggml.token_type must be a type from 0 to {BYTE} for each of the "
                        f"{len(tokens)} tokens")
    return _FROM_GGUF[model](gguf, tokens, types)


def sp_token_type(sp, i) -> int:
    """Token `i`'s GGUF type (tokenizer.ggml.token_type) in the sentencepiece model `sp`."""
    checks = ((sp.is_control, CONTROL), (sp.is_unknown, UNKNOWN), (sp.is_byte, BYTE), (sp.is_unused, UNUSED))
    return next((kind for check, kind in checks if check(i)), NORMAL)


def _drops_first_space(sp, tokens, types) -> bool:
    """Whether sentencepiece drops the "▁" that starts a sequence's first piece (it does with a dummy prefix)."""
    i = next((i for i, (t, k) in enumerate(zip(tokens, types)) if k == NORMAL and t.startswith(SPACE)), None)
    return i is not None and sp.decode([i]) != tokens[i].replace(SPACE, " ")


def from_sentencepiece_proto(model_proto: bytes) -> Tokenizer:
    """sentencepiece's own encoder (exact for BPE and unigram models alike) with our table decoder."""
    if not model_proto:  # sentencepiece itself would log several lines before failing
        raise UserError("not a valid sentencepiece model (the file is empty)")
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
        raise UserError(f"not a valid sentencepiece model ({str(e).strip()})") from None
    if sp.get_piece_size() == 0:
        raise UserError("not a valid sentencepiece model (it has no pieces)")
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [sp_token_type(sp, i) for i in range(len(tokens))]
    pieces, first = _decode_tables(tokens, types, _llama_piece, _drops_first_space(sp, tokens, types))
    bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
    return Tokenizer(sp.encode, pieces, first, bos_id, {sp.eos_id()} - {-1}, add_bos=True,
                     controls=_controls(tokens, types), folds=types.count(BYTE) < 256)  # (byte fallback: all 256)


def load_tokenizer(gguf_file=None, sp_model_path=None) -> Tokenizer:
    """From a sentencepiece .model when one is given, else from the GGUF file's metadata."""
    if sp_model_path is not None:
        regular_file(sp_model_path, "tokenizer model")
        try:
            with open(sp_model_path, "rb") as f:
                data = f.read(MAX_TOKENIZER_BYTES + 1)
            if len(data) > MAX_TOKENIZER_BYTES:
                raise UserError(f"larger than {MAX_TOKENIZER_BYTES >> 20} MiB: not a sentencepiece model")
            return from_sentencepiece_proto(data)
        except OSError as e:
            raise UserError(f"cannot read tokenizer model {sp_model_path}: {e.strerror}") from None
        except UserError as e:
            raise UserError(f"{sp_model_path}: {e}") from None
    if gguf_file is None:
        raise UserError("no tokenizer: give a GGUF file with a vocabulary or a sentencepiece .model file")
    return from_gguf(gguf_file)
