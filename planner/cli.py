"""The `meshplan` command line (console script). See DESIGN.md for the contract.

Subcommands living in other packages (launch, run, profile) are imported lazily, so that
`meshplan --help`, `plan` and `estimate` never import torch.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from cost_models.specs import InfeasibleLayout, SpecError

# name -> "module:attribute" of a click command, imported only when that command runs.
LAZY_COMMANDS = {
    "estimate": ("planner.cmd_estimate:estimate", "Predict step time and memory of one layout."),
    "plan": ("planner.cmd_plan:plan", "Search all valid layouts and rank the fastest that fit."),
    "models": ("planner.cmd_presets:models", "List model presets."),
    "clusters": ("planner.cmd_presets:clusters", "List cluster presets."),
    "launch": ("launcher.launch_cli:launch", "Write torchrun/SLURM/Kubernetes launch files for a plan."),
    "run": ("launcher.run_cli:run", "Launch a plan under supervision: detect faults, re-plan, resume."),
    "profile": ("profiler.cli:profile", "Measure this cluster (under torchrun) into cluster.yaml."),
    "simulate": ("planner.cmd_simulate:simulate", "Simulate a plan's step event by event (Gantt chart)."),
    "goodput": ("planner.cmd_goodput:goodput", "Expected training-time ratio under failures; checkpoint interval."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return None
        target, short_help = LAZY_COMMANDS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module_name.split(".")[0]):
                return click.Command(name, help=f"{short_help} (not available in this build)",
                                     callback=_unavailable(name))
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text from the table, so --help imports nothing.
        rows = [(name, LAZY_COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str):
    def callback() -> None:
        raise click.ClickException(f"meshplan {name} is not available in this build")
    return callback


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meshplan")
def cli() -> None:
    """meshplan: plan, launch and supervise distributed LLM training."""


MAX_MESSAGE_CHARS = 300
"""Longest error line printed (a pasted-in value never floods the terminal)."""


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line of at most `limit` characters, keeping its start (what is wrong)
    and its end (what to do)."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 5]} ... {text[-tail:]}"


def _fail(message: str, code: int) -> None:
    click.echo(one_line(f"error: {message}"), err=True)
    sys.exit(code)


def main() -> None:
    """Console entry: user mistakes become one line on stderr and exit code 2 (3: does not
    fit); never a traceback for bad input."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code if exc.exit_code else 2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (SpecError, InfeasibleLayout) as exc:
        _fail(str(exc), 2 if isinstance(exc, SpecError) else 3)
    except BrokenPipeError:  # `meshplan plan | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
