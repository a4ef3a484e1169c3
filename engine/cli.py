"""THE command-line error handling: a user error prints one line and exits non-zero; a bug keeps its traceback.

    @command
    def main(argv: list[str] | None = None) -> int:
        args = parser.parse_args(argv)
        ...                      # raise any BssanError: `error: <message>` on stderr, exit code exc.exit_code (2)
        return 0

Every `python -m ...` entry point and console script (pyproject.toml [project.scripts]) wraps its
`main` with `command`, so the mapping from errors to exit codes exists once. Ctrl-C prints one line
(`interrupted`, or the command's own hint, e.g. how to resume) and exits 130, no traceback.

Its parser is `ArgumentParser` (a bad option is `error: <prog>: <message>`, one line, exit 2, not
argparse's usage block), and numeric options take the checked types below, so an out-of-range
value is refused at parse time, before any work: `--batch-size -3`, `--memory-budget-mb nan`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path
from typing import Callable

from engine.errors import BssanError, InputError

INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def report_error(exc: BssanError) -> int:
    """Print `error: <message>` on one line of stderr; return the exit code of the error's type."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code


def command(main: Callable[..., int] | None = None, *, interrupted: str = "interrupted"):
    """Wrap a `main(argv=None) -> int` so that a BssanError becomes `error: <message>` and its exit code,
    and Ctrl-C the line `interrupted` (a resumable command says how to resume) and exit code 130.
    Use as `@command` or `@command(interrupted="interrupted; rerun the same command to continue")`."""
    if main is None:
        return functools.partial(command, interrupted=interrupted)

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BssanError as exc:
            return report_error(exc)
        except KeyboardInterrupt:
            print(interrupted, file=sys.stderr)
            return INTERRUPT_EXIT_CODE

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises InputError: `command` prints it as one `error:` line, exit 2."""

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------------------------
# Checked option types: `type=positive_int` refuses a bad value at parse time with one line


def _number(kind, text: str, low: float, inclusive: bool, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected} (a finite number)")
    if value < low or (value == low and not inclusive):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, 1, True, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _number(int, text, 0, True, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, 0.0, False, "a number > 0")


def nonnegative_float(text: str) -> float:
    return _number(float, text, 0.0, True, "a number >= 0")


def unit_float(text: str) -> float:
    """A number in [0, 1] (a score threshold, a fraction)."""
    value = _number(float, text, 0.0, True, "a number in [0, 1]")
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1]")
    return value


def output_file(text: str) -> Path:
    """An argparse type: a file path that can be written (check_output_file), refused at parse time."""
    try:
        check_output_file(Path(text), "")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return Path(text)


def output_dir(text: str) -> Path:
    """An argparse type: a folder that can be written or created (check_output_dir), refused at parse time."""
    try:
        check_output_dir(Path(text), "")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return Path(text)


def check_output_file(path: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a parent that is a file,
    a folder without write permission. The parent may not exist yet (it is created)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder; expected a file path")
    _check_parent(path, option)


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be written: an existing file, a parent that is a file,
    a folder without write permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: is a file; expected a folder (created if absent)")
    if path.is_dir():
        _probe_write(path, path, option)
        return
    _check_parent(path, option)


def _check_parent(path: Path, option: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():  # the first existing ancestor must be a writable folder
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: not writable ({parent} is a file); expected a path inside a folder")
    _probe_write(parent, path, option)


def _probe_write(folder: Path, path: Path, option: str) -> None:
    """Create and remove a file in `folder`: the only test that holds for root and read-only mounts alike."""
    probe = folder / f".bssan-write-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{option} {path}: not writable ({exc.strerror or type(exc).__name__} in {folder}); "
                         f"expected a folder this user can write") from None
