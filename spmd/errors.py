"""The one exception type for a user's mistake: it is printed as one line on rank 0, never as a traceback."""


class UserError(Exception):
    """Bad input (file, flag, prompt, hostfile): the message names the problem in one line."""
