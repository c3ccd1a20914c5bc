"""The Typer app. Commands are thin: they parse options and call the library.

Nothing here imports torch or timm at module level, so `vitdiag --help` stays instant.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated

import typer
import typer.core

from vitdiag import __version__

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import UsageError as _UsageError
except ImportError:  # pragma: no cover - older typer on plain click
    from click.exceptions import UsageError as _UsageError


class _OneLineErrors(typer.core.TyperGroup):
    """Click's usage errors (an unknown option, '--limit abc') as one line, like every other
    bad input: `error: ...` on stderr and exit 2, instead of the usage box."""

    @staticmethod
    def _one_line(e: Exception) -> Exception:
        if type(e).__name__ == "NoArgsIsHelpError":
            return e  # bare `vitdiag`: the help is the answer, not an error
        message = " ".join(e.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "vitdiag"
        typer.echo(f"error: {message}; see `{where} --help`.", err=True)
        return typer.Exit(2)

    def make_context(self, *args, **kwargs):  # noqa: ANN002, ANN003 - click's signature
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):  # noqa: ANN001 - click's signature
        try:
            return super().invoke(ctx)
        except _UsageError as e:
            raise self._one_line(e) from None


app = typer.Typer(
    cls=_OneLineErrors,
    name="vitdiag",
    help="Diagnostics for Vision Transformer checkpoints: what is wrong with a model, in numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors.", envvar="VITDIAG_DEBUG")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    _state["debug"] = debug


def friendly_errors(fn):
    """Bad input becomes one line on stderr and exit code 2; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vitdiag.errors import CheckFailed, VitdiagError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except VitdiagError as e:
            if _state["debug"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except CheckFailed:
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if _state["debug"]:
                raise
            typer.echo(
                f"error: {type(e).__name__}: {e} (this looks like a vitdiag bug; rerun with "
                "--debug for the traceback and report it)",
                err=True,
            )
            raise typer.Exit(3) from None

    return wrapper


# (command name, module under vitdiag.commands, function)
COMMANDS = [
    ("info", "info", "info"),
    ("eval", "evaluate", "evaluate"),
    ("variance", "variance", "variance"),
    ("augment", "augment", "augment"),
    ("fix-posembed", "fix_posembed", "fix_posembed"),
    ("calibrate", "calibrate", "calibrate"),
    ("similarity", "similarity", "similarity"),
    ("invariance", "invariance", "invariance"),
    ("collapse", "collapse", "collapse"),
    ("report", "report", "report"),
    ("findings", "findings", "findings"),
    ("check", "check", "check"),
    ("trend", "trend", "trend"),
]


def _register() -> None:
    import importlib
    import importlib.util

    for name, module, func in COMMANDS:
        full = f"vitdiag.commands.{module}"
        if importlib.util.find_spec(full) is None:
            continue
        app.command(name)(friendly_errors(getattr(importlib.import_module(full), func)))


_register()


def main() -> None:
    if os.environ.get("VITDIAG_DEBUG") and "--debug" not in sys.argv:
        _state["debug"] = True
    app()
