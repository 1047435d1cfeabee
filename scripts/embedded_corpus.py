"""The embedded model's training text: the Python 3.11 documentation's reStructuredText sources made into prose
and question/answer pairs. Used by scripts/train_embedded.py's `corpus` stage; nothing here imports spmd.

Reading a file is one pass over its lines (`Reader`): markup that is not prose is skipped with the block indented
under it (directives such as code-block, index, toctree; comments and link targets; literal blocks after "::";
doctest sessions; tables; field lists), the directives that hold prose (note, function, class, glossary, ...) keep
their bodies, section underlines turn the line above into a title, and inline markup is reduced to its text
(`inline`). What comes out is a list of `Para`s, each with the section and the documented object (a function, a
class, ...) it belongs to; `sections` and the pair builders turn those into training examples:

- prose: each section's title, then its paragraphs, one per line;
- pairs: a FAQ question with its answer; a glossary term ("What is a generator?") with its definition; a module
  ("What is the os module?"), a documented object ("What does os.listdir() do?") or a section title ("Tell me
  about the range() function.") with its first paragraph(s).
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

SKIP_FILES = ("whatsnew/", "license", "copyright", "about", "bugs", "contents", "includes/", "distutils/")
# Directives whose body is prose; the rest are skipped with their bodies.
OBJECTS = {"function", "method", "class", "exception", "attribute", "data", "decorator", "classmethod",
           "staticmethod", "coroutinefunction", "coroutinemethod", "awaitablefunction", "abstractmethod",
           "decoratormethod", "opcode", "pdbcommand", "envvar", "cmdoption", "describe", "object"}
C_OBJECTS = {"c:function", "c:member", "c:type", "c:var", "c:macro", "c:struct"}
PROSE = {"note", "warning", "important", "caution", "attention", "tip", "impl-detail", "topic", "sidebar",
         "glossary", "only", "epigraph", "admonition"} | OBJECTS | C_OBJECTS
ANSWER_CHARS = 420  # a pair's answer: its first paragraphs up to about this long (~100 tokens)

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
ADORNMENT = re.compile(r"^([=\-~^\"*+#'`.:_])\1{2,}\s*$")
TABLE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+)\s*$")
FIELD = re.compile(r"^\s*:[\w .-]+:(\s|$)")
BULLET = re.compile(r"^(\s*)([*+\-\u2022]|#\.|\d+\.|\(\d+\)|[a-z]\.)\s+(?=\S)")
ROLE = re.compile(r":[\w:.+-]+:`([^`]+)`")
TARGET = re.compile(r"^(.*?)\s*<[^<>]+>$", re.S)
LINK = re.compile(r"`([^`<]*?)\s*(<[^>]*>)?`__?")
SUBST = {"|version|": "3.11", "|release|": "3.11", "|today|": "", "|python_version_literal|": "3.11"}
WORDS = re.compile(r"[A-Za-z]{2,}")


@dataclass
class Para:
    text: str
    section: str  # the title of the section it is in
    obj: tuple = ()  # (kind, name) of the documented object it describes, if any
    first: bool = False  # the first paragraph of its object, or of its section outside any object


@dataclass
class Reader:
    """One file's lines -> paragraphs (`read`)."""
    lines: list
    paras: list = field(default_factory=list)
    title: str = ""
    module: str = ""
    objects: list = field(default_factory=list)  # [(indent, kind, name)] of the object directives open here
    buf: list = field(default_factory=list)  # the paragraph being read
    buf_indent: int = -1
    fresh_section: bool = True  # no paragraph yet in this section
    fresh_object: bool = True  # no paragraph yet in the innermost open object

    def read(self):
        i = 0
        while i < len(self.lines):
            i = self.line(i)
        self.flush()
        return self.paras

    def skip_block(self, i, indent):
        """The index of the first line after lines[i] that is not blank and indented no deeper than `indent`."""
        i += 1
        while i < len(self.lines) and (not self.lines[i].strip() or _indent(self.lines[i]) > indent):
            i += 1
        return i

    def skip_paragraph(self, i):
        while i < len(self.lines) and self.lines[i].strip():
            i += 1
        return i

    def line(self, i):
        raw = self.lines[i]
        text, indent = raw.strip(), _indent(raw)
        if not text:
            self.flush()
            return i + 1
        if self.objects and indent <= self.objects[-1][0]:
            self.flush()
            while self.objects and indent <= self.objects[-1][0]:
                self.objects.pop()
        if ADORNMENT.match(raw):
            if len(self.buf) == 1:  # the line above was a title
                self.title, self.buf, self.fresh_section = inline(self.buf[0]), [], True
            return i + 1
        m = DIRECTIVE.match(raw)
        if m:
            return self.directive(i, indent, m.group(2), m.group(3))
        if TABLE.match(raw) or text.startswith(">>>"):  # grid and simple tables, doctest sessions
            self.flush()
            return self.skip_paragraph(i)
        if COMMENT.match(raw) or FIELD.match(raw):
            self.flush()
            return self.skip_block(i, indent)
        return self.text(i, raw, indent)

    def directive(self, i, indent, name, arg):
        self.flush()
        if name in ("module", "currentmodule"):
            self.module = "" if arg.strip() == "None" else arg.strip()
        if name not in PROSE:
            return self.skip_block(i, indent)
        is_object = name in OBJECTS or name in C_OBJECTS
        if is_object:
            self.objects.append((indent, name, self.qualified(name, arg)))
            self.fresh_object = True
        body = [arg] if arg and not is_object and name not in ("only", "glossary") else []
        i += 1
        while i < len(self.lines) and self.lines[i].strip():  # options, the signature's continuation lines
            if body and not FIELD.match(self.lines[i]):  # or the text that ".. note:: Text" starts
                body.append(self.lines[i].strip())
            i += 1
        self.buf = body
        self.flush()
        return i

    def qualified(self, kind, arg):
        """The documented object's name as a reader would write it: its module or class first."""
        if kind in C_OBJECTS:
            head = arg.split("(")[0].split()
            return kind, head[-1].lstrip("*") if head else ""
        name = re.split(r"[(\s\[]", arg.strip(), maxsplit=1)[0]
        outer = [n for _, k, (_, n) in self.objects if k in ("class", "exception")]
        if outer and "." not in name:
            name = outer[-1] + "." + name
        elif self.module and "." not in name and kind not in ("cmdoption", "envvar", "opcode", "describe"):
            name = self.module + "." + name
        return kind, name

    def text(self, i, raw, indent):
        m = BULLET.match(raw)
        text_indent = len(m.group(0)) if m else indent
        if m or text_indent != self.buf_indent:
            self.flush()
        self.buf.append(raw[len(m.group(0)):].strip() if m else raw.strip())
        self.buf_indent = text_indent
        last = self.buf[-1]
        if last.endswith("::"):  # a literal block (code) follows, indented: "Example::" -> "Example:"
            self.buf[-1] = "" if last == "::" else last[:-3].rstrip() if last.endswith(" ::") else last[:-1]
            self.flush()
            return self.skip_block(i, indent)
        return i + 1

    def flush(self):
        text = inline(" ".join(self.buf))
        self.buf, self.buf_indent = [], -1
        if not is_prose(text) or text.endswith(":") and len(text.split()) < 10:  # "For example:" before code
            return
        obj = self.objects[-1][2] if self.objects else ()
        self.paras.append(Para(text, self.title, obj, self.fresh_object if obj else self.fresh_section))
        self.fresh_section = False
        if obj:
            self.fresh_object = False


def _indent(line):
    return len(line) - len(line.lstrip())


def _role_text(m):
    text = m.group(1)
    t = TARGET.match(text)
    if t and t.group(1):
        text = t.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].split(".")[-1]
    return text


def inline(text):
    """reStructuredText inline markup -> its plain text."""
    text = ROLE.sub(_role_text, text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = LINK.sub(lambda m: m.group(1) or (m.group(2) or "")[1:-1], text)
    text = re.sub(r"\*\*(\S.*?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\s*\[(#\w*|\d+)\]_", "", text)
    for k, v in SUBST.items():
        text = text.replace(k, v)
    text = re.sub(r"\|([\w -]+)\|", r"\1", text)
    text = text.replace("\\ ", "")
    text = re.sub(r"\\(.)", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def is_prose(text):
    """Sentences rather than code, a table's remains or a bare link."""
    words = text.split()
    if len(words) < 4 or len(WORDS.findall(text)) < 0.6 * len(words) or "::" in text or ".. " in text:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.75 * len(text) and (text[-1] in ".!?:;)" or len(words) >= 8)


# ---- examples ------------------------------------------------------------------------------------------------
def read_tree(folder):
    """{path relative to the folder: [Para]} for every .rst.txt worth reading."""
    out = {}
    for path in sorted(Path(folder).rglob("*.rst.txt")):
        rel = path.relative_to(folder).as_posix()
        if not rel.startswith(SKIP_FILES):
            out[rel] = Reader(path.read_text(encoding="utf-8").splitlines()).read()
    return out


def sections(paras):
    """Prose chunks: each section's title, then its paragraphs, one per line."""
    chunks, title, body = [], None, []
    for p in paras + [Para("", "\0")]:
        if p.section != title:
            if body:
                chunks.append("\n".join(([title] if title else []) + body))
            title, body = p.section, []
        if p.text:
            body.append(p.text)
    return chunks


def answer(paras, at):
    """The paragraphs from paras[at] on, of the same object and section, up to about ANSWER_CHARS."""
    text = paras[at].text
    for p in paras[at + 1:]:
        if p.obj != paras[at].obj or p.section != paras[at].section or p.first:
            break
        if len(text) + len(p.text) > ANSWER_CHARS:
            break
        text += "\n" + p.text
    if len(text) > 2 * ANSWER_CHARS:  # one long paragraph: cut after a sentence
        cut = text.rfind(". ", 0, 2 * ANSWER_CHARS)
        text = text[:cut + 1] if cut > ANSWER_CHARS // 2 else ""
    if text.endswith(":"):  # its example was code: end at the sentence before
        cut = max(text.rfind(". "), text.rfind("\n"))
        text = text[:cut + 1].rstrip() if cut > 0 else ""
    return text


CALLS = {"function", "method", "classmethod", "staticmethod", "coroutinefunction", "coroutinemethod",
         "awaitablefunction", "abstractmethod", "decorator", "decoratormethod", "c:function", "c:macro"}
NOUN = {"class": "the {} class", "exception": "the {} exception", "envvar": "the {} environment variable",
        "cmdoption": "the {} option", "opcode": "the {} opcode", "c:type": "the {} type"}
TOPIC = ("Tell me about {}.", "{}", "Explain {}.")


def object_question(kind, name):
    if kind in CALLS:
        return f"What does {name}() do?"
    return f"What is {NOUN.get(kind, '{}').format(name)}?"


def section_question(title, n):
    """A section title as a user might ask about it: a module's, a FAQ's question, or one of TOPIC."""
    module = re.match(r"^(\S+) --- ", title)
    if module:
        return f"What is the {module.group(1)} module?"
    t = title.rstrip(".:")
    if t.endswith("?"):
        return t
    if re.match(r"^(The|A|An) ", t):
        t = t[0].lower() + t[1:]
        return f"What is {t}?" if n % 2 else TOPIC[0].format(t)
    return TOPIC[n % len(TOPIC)].format(t)


def pairs(paras):
    """(question, answer) pairs of one file's paragraphs: each object's and each section's first ones."""
    out, seen = [], set()
    for at, p in enumerate(paras):
        if not p.first:
            continue
        q = object_question(*p.obj) if p.obj else section_question(p.section, len(out))
        a = answer(paras, at)
        if a and p.section and q not in seen and len(q) < 160:
            seen.add(q)
            out.append((q, a))
    return out


def glossary_pairs(folder):
    """("What is a generator?", the first paragraph of its definition) from the glossary's definition list."""
    path = Path(folder) / "glossary.rst.txt"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    out, term, body = [], None, []
    for line in lines + [""]:
        if _indent(line) == 3 and line.strip() and not line.strip().startswith(".."):
            term, body = inline(line.strip()), []
        elif term is not None and line.strip():
            body.append(line.strip())
        elif term is not None and body:  # a blank line ends the definition's first paragraph
            definition = inline(" ".join(body))
            if is_prose(definition) and len(definition) < 2 * ANSWER_CHARS:
                article = "an " if term[:1].lower() in "aeiou" else "a "
                out.append((f"What is {article if term[:1].islower() else ''}{term}?", definition))
            term, body = None, []
    return out


def examples(folder):
    """(prose chunks, (question, answer) pairs) of the documentation under `folder`."""
    tree = read_tree(folder)
    prose = [c for paras in tree.values() for c in sections(paras)]
    qa = [pair for paras in tree.values() for pair in pairs(paras)] + glossary_pairs(folder)
    return prose, qa
