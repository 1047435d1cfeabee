"""The one exception type for a user's mistake (printed as one line on rank 0, never as a traceback), and the
checks of user input that several modules share."""


class UserError(Exception):
    """Bad input (file, flag, prompt, hostfile): the message names the problem in one line."""


def is_whole_number(text) -> bool:
    """ASCII digits only: str.isdigit also accepts "²" and "١", which int() refuses or reads as another number."""
    return isinstance(text, str) and text.isascii() and text.isdigit()


def regular_file(path, what) -> str:
    """`path` if it names a regular file (not a folder, FIFO or device, which a read could hang on or never end);
    else a UserError naming `what` ("--tokenizer", "model file")."""
    import os
    import stat
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
