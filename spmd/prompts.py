"""What to generate: the prompts of a run, each with its own sampling settings, from the command line or a file.

A `--prompts-file` is one prompt a line (blank lines skipped), or, named `*.jsonl` or `*.ndjson` (in any case), JSON
Lines: one object a line,
  {"prompt": "text", "steps": 32, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7}
with "prompt_ids": [1, 2, 3] instead of "prompt" for token ids; every field but the prompt is optional and falls
back to the command line's flag. Read on rank 0 only; a mistake names the file and line.
"""
import json
import math
from dataclasses import dataclass

from .errors import UserError, as_sent, regular_file

MAX_FILE_BYTES = 64 * 2**20
JSON_LINES = (".jsonl", ".ndjson")  # a --prompts-file named so (in any case) is JSON Lines
SAMPLING = ("steps", "temperature", "top_k", "top_p", "seed")


@dataclass(frozen=True)
class PromptSpec:
    """One sequence to generate: a text (BOS added as the model says) or token ids, and settings (None: the
    flag's)."""
    text: str = ""
    ids: tuple = None
    steps: int = None
    temperature: float = None
    top_k: int = None
    top_p: float = None
    seed: int = None
    where: str = "the prompt"  # how messages name it: "--prompt 2", "p.jsonl line 3"

    def setting(self, name, opts):
        """This prompt's `name` ("steps", "temperature", ...), or the run's flag where it gives none."""
        value = getattr(self, name)
        return getattr(opts, name) if value is None else value


@dataclass(frozen=True)
class Work:
    """A sequence to generate, on rank 0: its index in input order, prompt token ids (an int64 array), steps and
    settings; `resume`, for a request a relaunched job goes on with (spmd.front), the tokens it had sampled and its
    sampler's state (a resume file's entry: spmd.journal)."""
    index: int
    ids: object
    steps: int
    spec: PromptSpec
    resume: dict = None


def read_prompts_file(path) -> list:
    """[PromptSpec] of the file's non-blank lines, in order."""
    regular_file(path, "--prompts-file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise UserError(f"--prompts-file {path}: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"--prompts-file {path} is larger than {MAX_FILE_BYTES >> 20} MiB")
    jsonl = str(path).lower().endswith(JSON_LINES)
    out = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):  # (a BOM: not text)
        where = f"{path} line {number}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        if not jsonl and not out and _looks_like_json_lines(line):
            raise UserError(f"{where} is a JSON object with a prompt, which a file read as plain text would take "
                            f"as the prompt itself: name the file *.jsonl to read it as JSON Lines")
        out.append(_json_prompt(line, where) if jsonl else PromptSpec(text=line, where=where))
    if not out:
        raise UserError(f"--prompts-file {path} holds no prompt")
    return out


def _looks_like_json_lines(line) -> bool:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and ("prompt" in obj or "prompt_ids" in obj)


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"the key {twice!r:.40} appears twice")
    return dict(pairs)


def _json_prompt(line, where) -> PromptSpec:
    try:
        obj = json.loads(line, object_pairs_hook=_unique_keys)
    except ValueError as e:
        raise UserError(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{where}: not JSON this reads (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with \"prompt\"")
    unknown = sorted(set(obj) - {"prompt", "prompt_ids", *SAMPLING})
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (known: prompt, prompt_ids, {', '.join(SAMPLING)})")
    if ("prompt" in obj) == ("prompt_ids" in obj):
        raise UserError(f"{where}: give \"prompt\" (a string) or \"prompt_ids\" (token ids), one of them")
    text, ids = obj.get("prompt", ""), obj.get("prompt_ids")
    if not isinstance(text, str):
        raise UserError(f"{where}: \"prompt\" must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: \"prompt\" holds an unpaired surrogate ({text[e.start]!r}): not a character") \
            from None
    if ids is not None and not (isinstance(ids, list) and all(_is_int(i) for i in ids)):
        raise UserError(f"{where}: \"prompt_ids\" must be a list of integers")
    if ids == []:
        raise UserError(f"{where}: \"prompt_ids\" is an empty list")
    checks = {"steps": (_is_int, lambda v: v >= 1, "a whole number of at least 1"),
              "temperature": (_is_number, lambda v: v >= 0, "a finite number of at least 0"),
              "top_k": (_is_int, lambda v: v >= 0, "a whole number of at least 0"),
              "top_p": (_is_number, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
              "seed": (_is_int, lambda v: v >= 0, "a whole number of at least 0")}
    for name, (kind, ok, what) in checks.items():
        if name in obj and not (kind(obj[name]) and ok(obj[name])):
            raise UserError(f"{where}: \"{name}\" must be {what} (got {as_sent(obj[name])})")
    return PromptSpec(text=text, ids=tuple(ids) if ids is not None else None, where=where,
                      **{name: obj[name] for name in SAMPLING if name in obj})


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
