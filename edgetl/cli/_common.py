"""Shared CLI plumbing: one-line errors with exit 2, --debug tracebacks, --json output, rich console."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

from edgetl.errors import EdgetlError

console = Console(stderr=True)
out = Console()


def debug_enabled() -> bool:
    return os.environ.get("EDGETL_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2) -> None:
    """Print one red line to stderr and exit. The message is plain text (paths may contain "[...]")."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(' '.join(str(message).splitlines()))}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # multi-line messages (TensorFlow's) folded into one line
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


#: Exit code for bugs / unexpected failures (not the user's input): distinct from 2 (bad input), 1 (check failed).
INTERNAL_ERROR_CODE = 3


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map EdgetlError to one line + its exit code (2); anything unexpected to one "internal error" line + exit 3.

    ``--debug`` (or ``EDGETL_DEBUG=1``) prints the traceback first. Typer/click control flow (``typer.Exit``,
    usage errors, aborts) passes through untouched.
    """
    import typer

    # typer.Exit/Abort are RuntimeErrors and usage errors are TyperExceptions: CLI control flow, not failures.
    passthrough = tuple(
        t
        for t in (getattr(typer, "Exit", None), getattr(typer, "Abort", None), getattr(typer, "TyperException", None))
        if isinstance(t, type)
    )

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except passthrough:
            raise
        except EdgetlError as exc:
            if debug_enabled():
                console.print_exception()
            fail(exc.one_line(), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; nothing half-written was left behind", 130)
        except MemoryError:
            if debug_enabled():
                console.print_exception()
            fail("out of memory; use a smaller --image-size or fewer images", 2)
        except Exception as exc:  # a bug or an unanticipated library failure: still one line, never a raw traceback
            if debug_enabled():
                console.print_exception()
            fail(f"internal error: {_first_line(exc)}; rerun with --debug for the traceback", INTERNAL_ERROR_CODE)

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


_FROM_MODEL: Any = object()


def option(
    model: Any, key: str, *param_decls: str, default: Any = _FROM_MODEL, help: str | None = None, **kwargs: Any
) -> Any:
    """A ``typer.Option`` for ``model``'s field ``key``: its default and help are the field's (default, description),
    so every default lives once, in edgetl.config. ``param_decls`` default to ``--key-with-dashes``; ``default``
    overrides only the form (e.g. a list for a repeatable flag), never the value; ``help`` is appended."""
    import typer

    field = model.model_fields[key]
    value = ... if field.is_required() else field.get_default(call_default_factory=True)
    if default is not _FROM_MODEL:
        value = default
    text = field.description or ""
    if help:
        text = f"{text} {help}".strip()
    decls = param_decls or ("--" + key.replace("_", "-"),)
    return typer.Option(value, *decls, help=text, **kwargs)
