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
    """Print one red line to stderr and exit."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map EdgetlError (and a few user-caused OS errors) to one line + exit 2; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
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

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
