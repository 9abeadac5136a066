"""The ``edgetl`` command line: thin Typer commands (parse → call library → render).

Importing this package must not import TensorFlow: ``edgetl verify`` runs on devices without it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from edgetl import __version__


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad value, an unknown flag) as ONE line and exit 2, like every other bad input.

    Typer's default prints a multi-line box; `--help` and a bare command (its help) are unchanged.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer import _click as click

        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            if not standalone_mode:
                raise
            from typer import rich_utils

            rich_utils.rich_format_error(exc)
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:
            if not standalone_mode:
                raise
            from edgetl.cli._common import fail

            where = getattr(getattr(exc, "ctx", None), "command_path", None) or "edgetl"
            fail(f"{exc.format_message().rstrip('.')}; see `{where} --help`", exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            from edgetl.cli._common import fail

            fail("aborted", 1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    name="edgetl",
    help=(
        "Fine-tune a pretrained image classifier on your photos, make it int8 with quantization-aware training, "
        "export TFLite/ONNX and verify accuracy and latency on the CPU where it will run."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgetl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    if debug:
        os.environ["EDGETL_DEBUG"] = "1"
    else:  # known-benign library warnings that users cannot act on (the QAT model is HDF5 by design, docs/qat.md)
        import warnings

        warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")


def _register() -> None:
    import importlib

    for module in ("finetune_cmd", "export_cmd", "verify_cmd", "run_cmd", "predict_cmd"):
        importlib.import_module(f"edgetl.cli.{module}").register(app)


_register()


def entrypoint() -> None:
    app()
