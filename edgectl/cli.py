"""The ``edgectl`` command line: thin commands over the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from edgectl import __version__
from edgectl.errors import EdgectlError

app = typer.Typer(
    help="Keep IoT telemetry in sync between edge sites and a cloud, "
    "driven by YAML rule chains.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USER_ERROR = 1
EXIT_BUG = 3
EXIT_INTERRUPT = 130


def setup_logging(verbose: bool) -> None:
    """Install one rich handler on the ``edgectl`` logger."""
    root = logging.getLogger("edgectl")
    root.handlers.clear()
    handler = RichHandler(console=err, show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    level = logging.DEBUG if verbose else logging.WARNING
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(level)


def fail(message: str) -> NoReturn:
    """Print a user-fixable error and exit 1."""
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(EXIT_USER_ERROR)


def print_json(data: Any) -> None:
    """Print data as JSON on stdout, for scripts."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"edgectl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log per-message detail.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Keep IoT telemetry in sync between edge sites and a cloud."""
    setup_logging(verbose)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Chain files to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print problems as JSON.")] = False,
    strict: Annotated[bool, typer.Option(help="Fail on warnings too.")] = False,
) -> None:
    """Check rule chain files: schema, then relations, cycles and reachability."""
    from edgectl.checks import validate_file

    problems = [problem for path in files for problem in validate_file(path)]
    if as_json:
        print_json([problem.as_dict() for problem in problems])
    else:
        for problem in problems:
            style = "red" if problem.is_error else "yellow"
            out.print(f"[{style}]{problem.render()}[/{style}]", markup=True)
    failed = any(p.is_error or strict for p in problems)
    if not as_json and not failed:
        out.print(f"{len(files)} file(s) valid", style="green")
    raise typer.Exit(EXIT_USER_ERROR if failed else 0)


def main() -> None:
    """Entry point: run the app with one error boundary and the exit codes."""
    try:
        code = app(standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except EdgectlError as error:
        err.print(f"error: {error}", markup=False)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPT)
    except Exception as error:
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if isinstance(error, click.exceptions.Abort):
            sys.exit(EXIT_INTERRUPT)
        err.print("edgectl hit a bug; please report it with this traceback:")
        err.print_exception()
        sys.exit(EXIT_BUG)
    sys.exit(code if isinstance(code, int) else 0)
