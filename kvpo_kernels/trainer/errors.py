"""Errors in what the user gave (config, files, arguments, a reward function): one line naming the key, file or
argument and what is allowed. ``kvpo-train`` prints them without a traceback and exits 2; from Python they are
ordinary ValueError / TypeError."""


class InputError(Exception):
    """Base of the user-input errors (the CLI catches exactly these)."""


class InputValueError(InputError, ValueError):
    pass


class InputTypeError(InputError, TypeError):
    pass
