"""What every ``wattwarden`` command shares: exit codes, the parser, converters, logging, signals.

Usage errors are one line on stderr and exit 2 (:class:`Parser` for argparse's own, the
``ConfigError`` path in ``wattwarden.cli.main`` for the rest); runtime failures exit 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn, TypeVar

from wattwarden.config import Setting, Switch, parse_int, parse_number

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        """Say the usage error in one line and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type=`` from a parser whose ValueError says what is wrong.

    (argparse would put its own ``invalid ... value`` in place of a ValueError's message.)
    """

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


int_arg = arg_type(parse_int)
float_arg = arg_type(parse_number)


def add_setting_flags(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """One flag per setting; a flag not given stays None, so the config file's value holds."""
    for s in settings:
        if isinstance(s.kind, Switch):
            parser.add_argument(
                s.flag, action=argparse.BooleanOptionalAction, default=None, help=s.help
            )
        else:
            parser.add_argument(s.flag, type=arg_type(s.kind.parse), metavar=s.metavar, help=s.help)


def setup_logging(level: int | str, *, timestamps: bool) -> None:
    """Log to stderr at ``level`` (a number or a name such as ``info``), unless already set up."""
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=level, format="%(asctime)s " + fmt if timestamps else fmt, stream=sys.stderr
    )


@contextmanager
def stop_on_signals(
    log: logging.Logger | None = None,
) -> Iterator[tuple[threading.Event, list[int]]]:
    """An event set by SIGTERM/SIGINT, and the signals that came; the old handlers come back.

    With ``log``, each signal is logged as ``SIGTERM: shutting down``.
    """
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if log is not None:
            log.info("%s: shutting down", signal.Signals(signum).name)
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop, received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
