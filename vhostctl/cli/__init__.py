"""The ``vhostctl`` command: one typer app, thin commands, one error boundary.

Command modules (``vhostctl.cli.<group>``) register themselves on :data:`app` and import the
library lazily inside each command, so ``vhostctl --help`` and ``--version`` stay fast and never
import pyroute2 or the datapath.  Library errors become a one-line message on stderr and the
exit code documented in vhostctl(8); tracebacks only with ``-v``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

import typer

from .. import __version__
from ..errors import EXIT_FAILURE, EXIT_USAGE, VhostctlError

app = typer.Typer(
    name="vhostctl",
    help="Set up, hand over, inspect and benchmark the vhost-net in-kernel virtio-net datapath.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

# Set by the global callback; commands read it through :func:`verbose`.
_state = {"verbose": 0}

JsonOpt = Annotated[
    bool, typer.Option("--json", "-j", help="Print machine-readable JSON (schema in vhostctl(8)).")
]

P = ParamSpec("P")
R = TypeVar("R")


def verbose() -> int:
    return _state["verbose"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vhostctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More detail; twice for tracebacks.")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Global options."""
    _state["verbose"] = verbose


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    """Print ``vhostctl: message`` on stderr; return the Exit to raise."""
    from ..render import err_console

    err_console().print(f"vhostctl: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Error boundary for a command: typed library errors -> message + stable exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except VhostctlError as e:
            if verbose() > 1:
                raise
            raise fail(str(e), e.code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except typer.BadParameter:
            raise
        except Exception as e:  # a bug: say so plainly, traceback on -vv
            if verbose() > 1:
                raise
            raise fail(f"internal error: {type(e).__name__}: {e} (rerun with -vv for a "
                       "traceback)", EXIT_FAILURE) from None

    return wrapper


def main() -> None:
    """Console-script entry point."""
    from . import commands  # noqa: F401  (registers every command on app)

    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        sys.exit(code)
