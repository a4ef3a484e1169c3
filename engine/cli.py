"""THE command-line error handling: a user error prints one line and exits non-zero; a bug keeps its traceback.

    @command
    def main(argv: list[str] | None = None) -> int:
        args = parser.parse_args(argv)
        ...                      # raise any BssanError: `error: <message>` on stderr, exit code exc.exit_code (2)
        return 0

Every `python -m ...` entry point and console script (pyproject.toml [project.scripts]) wraps its
`main` with `command`, so the mapping from errors to exit codes exists once.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from engine.errors import BssanError


def report_error(exc: BssanError) -> int:
    """Print `error: <message>` on one line of stderr; return the exit code of the error's type."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv=None) -> int` so that a BssanError becomes `error: <message>` and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BssanError as exc:
            return report_error(exc)

    return wrapper
