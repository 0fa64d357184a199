"""The root command group: whatever goes wrong in any command ends as one `error:` line.

Commands raise `fail(message, code)`; bad options and arguments raise the parser's usage
errors; anything else is a bug. `RootGroup.main` turns each into one `error: ...` line on
stderr (a JSON record under `--log-format json`), with every URL's password hidden, and
an exit code: 2 for bad arguments or usage, 1 for runtime failures, 130 for Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from .. import logs
from ..config import HIDDEN, redact_url

log = logging.getLogger("aiotasks.cli")

# typer >= 0.28 carries its own copy of click, older ones use click: find the exception
# classes through a public name rather than a private module.
_CLICK_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
ClickException: type[Exception] = _CLICK_ERRORS["ClickException"]
UsageError: type[Exception] = _CLICK_ERRORS["UsageError"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


class CliError(Exception):
    """A failure reported as one `error: ...` line and exit `code` (2 usage, 1 runtime).

    `detail` (a traceback worth showing, e.g. the user's import error) is printed first.
    """

    def __init__(self, message: str, code: int = 1, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


def fail(message: str, code: int = 1, detail: str | None = None) -> CliError:
    """Build the CliError to raise: `raise fail("no such queue")`."""
    return CliError(message, code, detail)


def hide_urls(text: str) -> str:
    """`text` with the password of every URL in it hidden."""
    return _URL.sub(_hide_url, text)


def _hide_url(m: re.Match[str]) -> str:
    url = m.group(0)
    if url.endswith(":") and HIDDEN in url:
        # Hidden already, before ": reason": the colon is the message's, not a password
        # parameter's (hiding the value again took it along).
        return redact_url(url[:-1]) + ":"
    return redact_url(url)


def say_error(message: str, detail: str | None = None) -> None:
    """Print `error: message` on stderr, after `detail` if any (JSON under --log-format json)."""
    message = hide_urls(message)
    if logs.json_enabled():
        fields = {"traceback": hide_urls(detail)} if detail else {}
        logs.emit(log, logging.ERROR, f"error: {message}", **fields)
        return
    if detail:
        typer.echo(hide_urls(detail).rstrip(), err=True)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


class RootGroup(TyperGroup):
    """The `aiotasks` group: runs a command and reports its failure as one line."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
            code = rv if isinstance(rv, int) else 0
        except Exception as exc:
            code = _report(exc)
        if standalone_mode:
            sys.exit(code)
        return code


def _report(exc: Exception) -> int:
    """Say what went wrong in one line; return the exit code."""
    if isinstance(exc, CliError):
        say_error(str(exc), exc.detail)
        return exc.code
    if isinstance(exc, UsageError):
        return _usage(exc)
    if isinstance(exc, ClickException):
        say_error(_sentence(_message(exc)))
        return int(getattr(exc, "exit_code", 1))
    if isinstance(exc, typer.Abort):
        say_error("interrupted")
        return 130
    if isinstance(exc, BrokenPipeError):
        # The reader went away (`aiotasks status | head -1`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    say_error(
        f"unexpected {type(exc).__name__}: {exc} (a bug in aiotasks? please report it, "
        "with the command line)"
    )
    return 1


def _usage(exc: Exception) -> int:
    ctx: Any = getattr(exc, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    if type(exc).__name__ == "NoArgsIsHelpError":
        # The help is the message (typer's rich help has been printed already).
        if _message(exc).strip():
            typer.echo(_message(exc))
        say_error(f"missing command{where}")
        return 2
    say_error(f"{_sentence(_message(exc))}{where}")
    return 2


def _message(exc: Exception) -> str:
    fmt = getattr(exc, "format_message", None)
    return str(fmt() if callable(fmt) else exc)


def _sentence(text: str) -> str:
    """Click's "No such option: --x." as "no such option: --x" (our lines are lowercase)."""
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
