"""Small helpers shared by the subcommands."""
from __future__ import annotations

import sys
from typing import Callable


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error the way every subcommand does, and return the exit code."""
    print(f"megacov: error: {message}", file=sys.stderr)
    return code


def config_errors_exit_2(fn: Callable[..., int]) -> Callable[..., int]:
    """Turn ConfigError into a one-line message and exit code 2 (bad input, not a crash)."""
    from megacov.config import ConfigError

    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            return fail(str(exc), 2)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def not_available(what: str) -> int:
    """Unfinished subcommands say so plainly and exit non-zero: no fake output."""
    return fail(f"{what} is not available in this version of megacov", 1)
