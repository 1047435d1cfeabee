"""The one exception type for a user's mistake (printed as one line on rank 0, never as a traceback), the checks of
user input that several modules share, and how a click command runs as a program (`click_main`)."""
import json
import sys


class UserError(Exception):
    """Bad input (file, flag, prompt, hostfile): the message names the problem in one line."""


def as_sent(value) -> str:
    """A value of a JSON request or file as it is spelled there (true, null, "text", Infinity; another object as
    Python's repr), its first 40 characters: for an error that names it."""
    return json.dumps(value, default=repr)[:40]


def click_error_line(e, prog) -> str:
    """A click error as one line, "error: ...", with where --help is for a usage mistake (click's own block for
    one is three lines)."""
    import click
    hint = f" (see {prog} --help)" if isinstance(e, click.UsageError) else ""
    return f"error: {e.format_message()}{hint}"


def click_main(command, prog, argv=None, passed_on=()):
    """Run a click command as the program `prog`: a usage mistake is one line on stderr (`click_error_line`), exit
    2; its other errors one line `error: ...` (as spmd.run's), exit 1; Ctrl-C exit 130. Errors of the classes in
    `passed_on` are raised to the caller instead (to say more)."""
    import click
    refuse_repeats(command)
    try:
        code = command.main(args=argv, prog_name=prog, standalone_mode=False)
    except tuple(passed_on):
        raise
    except click.ClickException as e:  # (a UsageError too, which click_error_line tells where --help is)
        click.echo(click_error_line(e, prog), err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    if isinstance(code, int):  # (--help, or the command's ctx.exit)
        sys.exit(code)


def refuse_repeats(command):
    """Make an option given twice a usage error for `command` (click keeps the last value and says nothing, so
    `--prompt-ids 1,2 --prompt-ids 3` ran on 3), and for a group's subcommands. Options that take several values,
    counts and flags are left free."""
    import click
    for sub in getattr(command, "commands", {}).values():
        refuse_repeats(sub)
    make_parser = type(command).make_parser

    def parser_refusing_repeats(ctx):
        parser = make_parser(command, ctx)
        parse = parser.parse_args

        def parse_args(args):
            opts, rest, order = parse(args)
            seen = set()
            for p in order:
                if isinstance(p, click.Option) and not (p.multiple or p.count or p.is_flag):
                    if p.name in seen:
                        raise click.UsageError(f"option {max(p.opts, key=len)} is given more than once", ctx)
                    seen.add(p.name)
            return opts, rest, order
        parser.parse_args = parse_args
        return parser
    command.make_parser = parser_refusing_repeats


def is_whole_number(text) -> bool:
    """ASCII digits only: str.isdigit also accepts "²" and "١", which int() refuses or reads as another number."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text, what) -> int:
    """Bytes from "2G", "512M", "1.5GiB", "300000000" (K, M, G, T, P: powers of 1024, "MB" too; B, iB allowed
    after them)."""
    t = str(text).strip().upper()
    t = t.removesuffix("IB") if t[-3:-2] in SIZE_UNITS and t[-3:-2] else t.removesuffix("B")  # (iB after a unit)
    unit = t[-1:] if t[-1:] in SIZE_UNITS else ""
    number = t[:len(t) - len(unit)]
    whole, _, frac = number.partition(".")
    if not (is_whole_number(whole or "0") and (not frac or is_whole_number(frac)) and (whole or frac)):
        raise UserError(f"{what} {text!r}: expected a size such as 2G, 512M or 1.5GiB")
    n = float(f"{whole or 0}.{frac or 0}") * SIZE_UNITS[unit]
    if not n < 2**60:  # (inf for hundreds of digits)
        raise UserError(f"{what} {text[:40]!r}: beyond any machine's memory (under 1024P)")
    return int(n)


def nonempty(_ctx, param, value):
    """A click callback: a name flag given as "" (an unset shell variable, say) is refused, not taken as not
    given."""
    import click
    if value is not None and not value.strip():
        raise click.BadParameter("the name is empty", param=param)
    return value


def human_size(n) -> str:
    """Bytes as a person reads them: 812 B, 10.0 KiB, 56.3 MiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def regular_file(path, what) -> str:
    """`path` if it names a regular file (not a folder, FIFO or device, which a read could hang on or never end);
    else a UserError naming `what` ("--tokenizer", "model file")."""
    import os
    import stat
    if not str(path):
        raise UserError(f"{what}: the name is empty")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError:  # a NUL byte in the path
        raise UserError(f"{what} {path!r}: not a file name") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file (a pipe or a device)")
    return path
