"""The `minigpt` command line: parse flags, call one function per command, nothing more.

User errors (`UserError`) are caught once here and printed as a single line with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from minigpt_cli.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Train small GPT language models on your own text, and run them.",
)
err = Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml")],
    resume: Annotated[bool, typer.Option(help="Continue the run in out_dir from its last "
                                               "checkpoint.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: "
                                                   "--set train.max_steps=500 (repeatable).")
                    ] = None,
) -> None:
    """Teacher-forced training: one pass over all positions per batch, dropout on."""
    from minigpt_cli.config import load_config
    from minigpt_cli.train import Interrupted
    from minigpt_cli.train import train as run_train

    cfg = load_config(config, set_)
    try:
        run_train(cfg, resume=resume, console=err)
    except Interrupted as e:
        err.print(f"[yellow]{e}[/]")
        raise typer.Exit(130) from None


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help="Corpus to fetch; only 'shakespeare' needs it.")
                      ] = "shakespeare",
) -> None:
    """Fetch and convert the built-in corpus now, so training later needs no network."""
    from minigpt_cli.data import prepare_shakespeare

    if source != "shakespeare":
        raise UserError(f"nothing to prepare for '{source}': only 'shakespeare' is built in")
    path = prepare_shakespeare()
    err.print(f"corpus ready: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
