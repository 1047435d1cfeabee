"""Chat messages -> prompt text, by the model's own chat template (the GGUF's `tokenizer.chat_template`, a Jinja
template as Hugging Face writes them) rendered in Jinja's immutable sandbox, or by FALLBACK where the file has none.

The template sees `messages` (each a dict with "role" and "content" text), `add_generation_prompt` (True),
`bos_token` and `eos_token` (their texts), `raise_exception(message)` and `strftime_now(format)`, as Hugging Face's
`apply_chat_template` gives them. A template that fails is the caller's problem to report (TemplateError), and so is
one that runs longer than RENDER_LIMIT_S, writes more than MAX_VALUE characters, or builds a value over MAX_VALUE or a
number over MAX_INT_BITS (the sandbox bounds `range` alone: nested loops, a repeated or doubled string could
otherwise hold a server's thread, and its exit, for ever, or take all its memory). Every operator, `~`, method call
and filter is checked, before it runs where one operation could make a value far larger than its inputs (`*`,
`**`, a join, a replace, a format's width), and its result after.
"""
import datetime
import functools
import re
import sys
import time

import jinja2
import jinja2.ext
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used where the GGUF file has no tokenizer.chat_template: a plain transcript the model continues after
# "Assistant:"; a system message opens it. The README documents it.
FALLBACK = ("{% for m in messages %}"
            "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
            "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
            "{% elif m['role'] == 'tool' %}Tool: {{ m['content'] }}\n"
            "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_TEMPLATE_CHARS = 256 * 1024
RENDER_LIMIT_S = 2.0  # a render's time at most (a real template renders a chat in milliseconds)
MAX_VALUE = 16 << 20  # items (characters) of a value `*` repeats or a filter or method fills, or a render writes
MAX_INT_BITS = 1 << 16  # bits of a number arithmetic makes (a long multiplication or division holds the GIL)


class TemplateError(Exception):
    """The chat template could not be read or rendered (the message says why)."""


def _raise(message):
    raise TemplateError(str(message))


class _Overtime(BaseException):
    """The render's deadline passed: raised by its trace function, past any `except Exception` in Jinja's code."""


def _too_large():
    return TemplateError("the model's chat template builds a value too large")


def _checked(value):
    """`value`, where it holds at most MAX_VALUE items (characters)."""
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_VALUE:
        raise _too_large()
    return value


def _sizes(args, kwargs):
    """Refuse a number over MAX_VALUE among a call's arguments: a width or count the call would fill."""
    if any(isinstance(a, int) and abs(a) > MAX_VALUE for a in (*args, *kwargs.values())):
        raise _too_large()


PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")  # a %-conversion's width, precision
BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")  # a str.format field's spec


def _widths(text, args=(), kwargs=None):
    """A format string (`%`, str.format, |format) whose widths and precisions together would fill more than
    MAX_VALUE: its own numbers, and the arguments a `*` takes (str.format's nested fields are arguments, checked
    by `_sizes`)."""
    if not isinstance(text, str):
        return
    numbers = [n for spec in PERCENT_SPEC.findall(text) for n in spec if n and n != "*"]
    numbers += [n for spec in BRACE_SPEC.findall(text) for n in re.findall(r"\d+", spec)]
    if sum(int(n) if len(n) <= 8 else MAX_VALUE + 1 for n in numbers) > MAX_VALUE:
        raise _too_large()
    if any("*" in spec for spec in PERCENT_SPEC.findall(text)):
        _sizes(args if isinstance(args, tuple) else (args,), kwargs or {})


def _text_size(value, limit=MAX_VALUE):
    """At least the length of str(value) (a container's items' reprs, up to 4 characters a character of a string's
    escapes), counted without making it and given up past `limit`: more than `limit` where it would be over."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += 4 * len(v) + 2
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        else:
            total += 64 if not isinstance(v, int) else len(str(v)) if v.bit_length() <= MAX_INT_BITS else limit + 1
    return total


def _text(value):
    """Refuse a value whose text would be over MAX_VALUE characters (`_text_size`), before it is made."""
    if not isinstance(value, str) and _text_size(value) > MAX_VALUE:
        raise _too_large()
    return value


def _joined(sep, items, texts=True):
    """The items a join (str.join, |join, `~`) is to put together, as a list (their texts, where `texts`), refused
    where the result would be over MAX_VALUE characters, before it is made."""
    out, total = [], 0
    for x in items:
        x = str(_text(x)) if texts else x
        total += len(sep) + (len(x) if isinstance(x, str) else 0)
        if total > MAX_VALUE:
            raise _too_large()
        out.append(x)
    return out


def _sized(f, before=None):
    """Filter `f` with its result checked (`_checked`), and its value first passed through `before(value, *args,
    **kwargs)` (its arguments after what Jinja passes some first: a context), which refuses what would be too
    large."""
    first = 1 if hasattr(f, "jinja_pass_arg") else 0

    @functools.wraps(f)  # (with Jinja's mark of what it passes first)
    def sized(*args, **kwargs):
        if before is not None:
            value = before(*args[first:], **kwargs)
            args = (*args[:first], value, *args[first + 1:])
        return _checked(f(*args, **kwargs))
    return sized


def _fills(value, *args, **kwargs):
    """A filter whose arguments are widths or counts it fills (center, batch, slice, truncate)."""
    _sizes(args, kwargs)
    return value


def _replacing(value, old, new, count=None):
    """|replace and str.replace, refused where the result would be over MAX_VALUE characters."""
    text, old, new = str(_text(value)), str(_text(old)), str(_text(new))
    times = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    if len(text) + times * (len(new) - len(old)) > MAX_VALUE:
        raise _too_large()
    return value


def _indenting(value, width=4, *args, **kwargs):
    """|indent: its width (a number, or a string put before each line) times the lines."""
    text = str(_text(value))
    each = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if len(text) + each * (text.count("\n") + 1) > MAX_VALUE:
        raise _too_large()
    return value


def _wrapping(value, width=79, break_long_words=True, wrapstring=None, *args, **kwargs):
    """|wordwrap: its wrapstring once a line, at most a line a character."""
    text = str(_text(value))
    if len(text) * (1 + len(str(wrapstring or ""))) > MAX_VALUE:
        raise _too_large()
    return value


def _serialising(value, indent=None, *args, **kwargs):
    """|tojson and |pprint: the value's text, and an indent (repeated on every line) of at most 64."""
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 64):
        raise TemplateError("the model's chat template asks for a JSON indent over 64")
    most = MAX_VALUE // (2 + (indent or 0))  # (every character may start a line of its own, indented)
    if _text_size(value, most) > most:
        raise _too_large()
    return value


def _summing(value, attribute=None, start=0):
    """|sum of numbers only: with a list or a string to start from, each item's addition copies all before it."""
    if not isinstance(start, (int, float)):
        raise TemplateError("the model's chat template sums lists or strings (|sum with a start that is not a number)")
    return value


def _joining(value, d="", attribute=None):
    """|join (with an attribute, only its result is checked)."""
    return value if attribute is not None else _joined(str(d), value)


def _formatting(value, *args, **kwargs):
    """|format: its widths (`_widths`)."""
    _widths(value, args, kwargs)
    return value


class _Generator(CodeGenerator):
    """`~` through the environment's `concat` (Jinja's own join is not checked)."""
    def visit_Concat(self, node, frame):
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every value a template makes bounded (MAX_VALUE items, numbers MAX_INT_BITS):
    one operation could take gigabytes or minutes, which the render's time limit cannot stop (and Jinja runs a
    filter of constants once, as it compiles the template)."""
    intercepted_binops = frozenset({"*", "**", "+", "-", "//", "%", "/"})
    code_generator_class = _Generator
    BEFORE = {"center": _fills, "batch": _fills, "slice": _fills, "truncate": _fills, "indent": _indenting,
              "wordwrap": _wrapping, "replace": _replacing, "join": _joining, "format": _formatting,
              "tojson": _serialising, "pprint": _serialising, "string": _text, "sum": _summing}

    def __init__(self, **options):
        super().__init__(finalize=_text, **options)  # (finalize: each {{ }}'s value, before its text is made)
        for name, f in self.filters.items():
            self.filters[name] = _sized(f, self.BEFORE.get(name))

    @staticmethod
    def concat(items):
        """`~`: the items' texts joined, at most MAX_VALUE characters."""
        return "".join(_joined("", items))

    def call(__self, __context, __obj, *args, **kwargs):  # (Jinja's names: a template's arguments may be any)
        _sizes(args, kwargs)
        text = getattr(__obj, "__self__", None)
        if isinstance(text, str):  # a string's method
            name = __obj.__name__
            if name == "join" and args:
                args = (_joined(text, args[0], texts=False), *args[1:])
            elif name in ("format", "format_map"):  # (Jinja before 3.1.5; later ones: wrap_str_format)
                _widths(text, args, kwargs)
            elif name == "replace" and len(args) >= 2:
                _replacing(text, *args[:3])
            elif name == "expandtabs" and len(text) + text.count("\t") * (args[0] if args else 8) > MAX_VALUE:
                raise _too_large()
            elif name == "translate":
                raise TemplateError("the model's chat template calls str.translate, which spmd does not run")
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """Jinja 3.1.5 and later: a string's format and format_map, sandboxed as they are looked up (`call` then
        sees Jinja's wrapper), with their widths checked (`_widths`)."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args, **kwargs):
            _widths(value.__self__, args, kwargs)
            return wrapped(*args, **kwargs)
        return checked

    def call_binop(self, context, operator, left, right):
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length(), right.bit_length()
            made = (abs(right) * bits[0] if operator == "**" else sum(bits) if operator == "*" else max(bits))
            if made > MAX_INT_BITS:
                raise TemplateError("the model's chat template builds a number too large")
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_VALUE:
                    raise _too_large()
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > MAX_VALUE:
                raise _too_large()
        elif operator == "%" and isinstance(left, str):
            _widths(left, right)
            _text(right)
        return _checked(super().call_binop(context, operator, left, right))


class ChatTemplate:
    def __init__(self, source, bos_token="", eos_token=""):
        """`source`: the template's text, or None for FALLBACK."""
        self.builtin = source is None
        if source is not None and (not isinstance(source, str) or len(source) > MAX_TEMPLATE_CHARS):
            raise TemplateError(f"tokenizer.chat_template must be text of at most {MAX_TEMPLATE_CHARS} characters")
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals.update(raise_exception=_raise,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(str(fmt)))
        try:
            self._template = env.from_string(FALLBACK if source is None else source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": text}]) with the assistant's turn opened, within
        RENDER_LIMIT_S: each line the render runs checks the clock (a trace function on this thread)."""
        deadline = time.monotonic() + RENDER_LIMIT_S

        def each_line(frame, event, arg):
            if time.monotonic() > deadline:
                raise _Overtime
            return each_line

        before = sys.gettrace()
        sys.settrace(lambda frame, event, arg: each_line)
        try:
            parts, written = [], 0
            for part in self._template.generate(messages=messages, add_generation_prompt=True,
                                                bos_token=self.bos_token, eos_token=self.eos_token):
                written += len(part)
                if written > MAX_VALUE:
                    raise TemplateError(f"the model's chat template writes more than {MAX_VALUE} characters")
                parts.append(part)
            return "".join(parts)
        except _Overtime:
            raise TemplateError(f"the model's chat template took longer than {RENDER_LIMIT_S:g} s on these "
                                "messages") from None
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                RecursionError, OverflowError, MemoryError) as e:
            raise TemplateError(f"the model's chat template failed on these messages: {e}"[:300]) from None
        finally:
            sys.settrace(before)


def from_gguf(gguf, tokenizer) -> ChatTemplate:
    """The file's template (or FALLBACK), with its BOS and EOS texts."""
    eos = gguf.meta("tokenizer.ggml.eos_token_id", min(tokenizer.eos_ids, default=None))
    return ChatTemplate(gguf.meta("tokenizer.chat_template"), tokenizer.piece_text(tokenizer.bos_id),
                        tokenizer.piece_text(eos))


def load_template(gguf, tokenizer, log) -> ChatTemplate:
    """from_gguf, or the built-in template where the file has none or one that does not load (said with `log`)."""
    try:
        template = from_gguf(gguf, tokenizer)
    except TemplateError as e:
        log(f"note: {e}; chats use the built-in template (see the README)")
        return ChatTemplate(None)
    if template.builtin:
        log("note: the model file has no chat template; chats use the built-in one (see the README)")
    return template
