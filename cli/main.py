"""The `meshplan` entry point: builds the typer app and maps known errors to exit codes.

Owns: the app, the command registry and the error boundary. Each command lives in its own
module under cli/ and exposes `register(app)`; commands import heavy packages lazily.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from cli.stdio import guarded_stdout
from planner.errors import MeshplanError

COMMAND_MODULES = (
    # in the order of the workflow: look up, measure, predict, plan, check the fit, run, check
    "cli.presets_cmd",
    "cli.model_cmd",
    "cli.env_cmd",
    "cli.profile_cmd",
    "cli.estimate_cmd",
    "cli.plan_cmd",
    "cli.replan_cmd",
    "cli.memcheck_cmd",
    "cli.launch_cmd",
    "cli.export_cmd",
    "cli.validate_cmd",
)


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="meshplan",
        help="Plan, check and launch parallel training of transformer models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app)
    return app


def build_command() -> Any:
    """The (click) command group behind the app, with boolean flags shown without a `<bool>`
    value: typer's rich help would otherwise invite `--json true`. Attributes are read by name
    because typer >= 0.22 vendors click instead of depending on it."""
    group = typer.main.get_command(build_app())
    for command in group.commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
    return group


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; known errors print one `error:` line to stderr and exit with their code.

    stdout carries data only: see cli/stdio.py for the guard around every command.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    group = build_command()
    with guarded_stdout(json_only="--json" in args):
        return _run(group, args)


def _run(group: Any, args: list[str]) -> int:
    if not args:
        # A bare `meshplan`: the help, then what is missing (click's own message is empty).
        with group.make_context("meshplan", ["--help"], resilient_parsing=True) as ctx:
            print(ctx.get_help(), file=sys.stderr)
        print(f"error: missing command; use one of: {', '.join(group.commands)}", file=sys.stderr)
        return 2
    try:
        rc = group.main(args=args, prog_name="meshplan", standalone_mode=False)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Usage errors from typer's (vendored) click carry format_message(); anything else is a bug.
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            print(f"error: {e.format_message()}", file=sys.stderr)
            return 2
        raise
    return rc if isinstance(rc, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
