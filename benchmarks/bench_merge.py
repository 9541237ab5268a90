"""Speed and memory of ``mergeflow merge`` against mergekit 0.1.5 and the I/O floor, in the same run.

Builds a base and N fine-tunes of a Llama-shaped model (default: hidden 768, 9 layers, vocab
32000 = 106M parameters, bf16; the issue-10 setup), then for each method runs the same mergekit
YAML through ``mergekit-yaml`` and ``mergeflow merge`` (each in its own process, at its
defaults), plus the I/O floor (``io_floor.py``: read every input tensor once, write the output),
alternating ``--repeat`` times so drifts in machine load hit every command alike. Reports the
median (min-max) of the whole command's wall time and peak RSS (``os.wait4``'s ru_maxrss of
the child), the ratios to mergekit and to the floor, and the load average seen during the runs:
ratios only mean something on an otherwise idle machine. Not part of the test suite (``make bench``).

``--size-curve`` adds linear and ties (mergeflow and mergekit, ``--curve-repeat`` runs each) at
growing depth, fixed width and vocabulary (9, 36, 72, 144 layers: about 0.1B to 1B parameters;
the first depth reuses the table's runs when it is the table's model), and ``--wide`` one point
at a larger width (hidden 1536, 8 layers: about as many parameters as 36 layers at 768, with
vocabulary-sized groups twice as large), so a summary shows whether time grows with the
parameters and peak RSS with the largest tensor group rather than with the model. ``--quick``
runs everything at toy sizes (a smoke test of the script, seconds per command).

    .venv/bin/python benchmarks/bench_merge.py --repeat 3 --size-curve --wide --results benchmarks/results.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

# mergekit's parameter names, the same YAML for both tools; slerp runs between the two fine-tunes
METHODS = {
    "ties": {"base": True, "model": {"weight": 1.0, "density": 0.3}},
    "breadcrumbs": {"base": True, "model": {"weight": 1.0, "density": 0.9, "gamma": 0.01}},
    "della": {"base": True, "model": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, "parameters": {"lambda": 1.0}},
    "linear": {"base": False, "model": {"weight": 1.0}},
    "task_arithmetic": {"base": True, "model": {"weight": 1.0}},
    "slerp": {"base": False, "model": {}, "parameters": {"t": 0.5}, "first_is_base": True},
    "dare_ties": {"base": True, "model": {"weight": 1.0, "density": 0.5}},
}


def build(root: Path, hidden: int, layers: int, vocab: int, n_models: int) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256))
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(n_models):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
        paths[f"ft{i}"] = root / f"ft{i}"
        base.save_pretrained(paths[f"ft{i}"])
        with torch.no_grad():
            for p in base.parameters():
                p.sub_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 1)).to(p.dtype) * 0.01)
    return paths


# Runs the command as its child and reports the child's peak RSS: ru_maxrss survives exec, so the
# measured process must be forked from a small one (this, started without site), never from the
# benchmark itself, which holds torch.
_MEASURE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nMAXRSS_KB {usage.ru_maxrss}\\n")
sys.exit(min(abs(os.waitstatus_to_exitcode(status)), 255))
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command: ``os.wait4``'s ru_maxrss (KiB on Linux)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", _MEASURE, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=ENV, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, int(done.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0]) / 1024


def alternate(commands: dict[str, list[str]], repeat: int, before_each=None) -> dict[str, tuple[list[float], list[float]]]:
    """Run every command ``repeat`` times, alternating, so that drifts in machine load hit every
    command alike: ``{label: (wall seconds, peak RSS MB)}``. ``before_each(label)`` runs first
    (outside the measurement: removing the previous output)."""
    results: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label in commands}
    for _ in range(repeat):
        for label, cmd in commands.items():
            if before_each is not None:
                before_each(label)
            wall, rss = timed(cmd)
            results[label][0].append(wall)
            results[label][1].append(rss)
    return results


def median_range(values: list[float], unit: str = "s", digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def mergekit_config(method: str, paths: dict[str, Path], n_models: int) -> dict:
    spec = METHODS[method]
    models = [{"model": str(paths[f"ft{i}"]), **({"parameters": dict(spec["model"])} if spec["model"] else {})}
              for i in range(n_models)]
    config = {"merge_method": method, "dtype": "bfloat16", "models": models}
    if spec["base"]:
        config["base_model"] = str(paths["base"])
    if spec.get("first_is_base"):
        config["base_model"] = str(paths["ft0"])
    if "parameters" in spec:
        config["parameters"] = dict(spec["parameters"])
    return config


def mergeflow_command(src: Path | None) -> list[str]:
    """``mergeflow``: the installed one, or the one of checkout ``src`` (its folder first on the path)."""
    if src is None:
        return [str(BIN / "mergeflow")]
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); from flows.cli import main; main()"]


def commands_for(method: str, root: Path, paths: dict[str, Path], n_models: int, src: Path | None,
                 compare: Path | None) -> dict[str, list[str]]:
    cfg = root / f"{method}.yml"
    cfg.write_text(yaml.safe_dump(mergekit_config(method, paths, n_models)))
    inputs = ([paths["base"]] if METHODS[method]["base"] else []) + [paths[f"ft{i}"] for i in range(n_models)]
    commands = {
        f"{method}/mergekit": [str(BIN / "mergekit-yaml"), str(cfg), str(root / "out-mergekit"), "--quiet"],
        f"{method}/mergeflow": [*mergeflow_command(src), "merge", str(cfg), str(root / "out-mergeflow"), "-q"],
        f"{method}/floor": [sys.executable, str(HERE / "io_floor.py"), str(root / "out-floor"), *map(str, inputs)],
    }
    if compare is not None:  # the same command run from another checkout (e.g. before a change)
        commands[f"{method}/compare"] = [*mergeflow_command(compare), "merge", str(cfg), str(root / "out-compare"), "-q"]
    return commands


def run_table(methods: list[str], root: Path, paths: dict[str, Path], n_models: int, repeat: int, src: Path | None,
              compare: Path | None, tools: tuple[str, ...] = ("mergekit", "mergeflow", "floor", "compare")) -> list[dict]:
    commands: dict[str, list[str]] = {}
    for method in methods:
        commands.update({k: v for k, v in commands_for(method, root, paths, n_models, src, compare).items()
                         if k.split("/")[1] in tools})

    def clean(label: str) -> None:  # every output removed before each command: one output on disk at a time
        for out in root.glob("out-*"):
            shutil.rmtree(out, ignore_errors=True)

    loads = [os.getloadavg()[0]]
    results = alternate(commands, repeat, before_each=clean)
    loads.append(os.getloadavg()[0])
    clean("")
    rows = []
    for method in methods:
        row = {"method": method, "load": loads}
        for tool in ("mergekit", "mergeflow", "floor", "compare"):
            if f"{method}/{tool}" in results:
                row[tool] = results[f"{method}/{tool}"]
        rows.append(row)
    return rows


def format_rows(rows: list[dict], title: str) -> list[str]:
    med = statistics.median
    has_compare = any("compare" in r for r in rows)
    has_floor = all("floor" in r for r in rows)
    head = ["merge", "mergeflow", "mergekit", *(["I/O floor"] if has_floor else []), "time / mergekit",
            *(["time / floor"] if has_floor else []), "RSS / mergekit", *(["RSS / floor"] if has_floor else [])]
    if has_compare:
        head += ["compare (other checkout)", "time / compare", "RSS / compare"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        (ft, fm), (kt, km) = r["mergeflow"], r["mergekit"]
        lt, lm = r.get("floor", ([1.0], [1.0]))
        cells = [r["method"], f"{median_range(ft)}, {med(fm):.0f} MB", f"{median_range(kt)}, {med(km):.0f} MB",
                 *([f"{median_range(lt)}, {med(lm):.0f} MB"] if has_floor else []), f"{med(ft) / med(kt):.2f}",
                 *([f"{med(ft) / med(lt):.2f}"] if has_floor else []), f"{med(fm) / med(km):.2f}",
                 *([f"{med(fm) / med(lm):.2f}"] if has_floor else [])]
        if has_compare:
            ct, cm = r["compare"]
            cells += [f"{median_range(ct)}, {med(cm):.0f} MB", f"{med(ft) / med(ct):.2f}", f"{med(fm) / med(cm):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Point:
    """One model of the size curve and the linear / ties rows measured on it."""

    hidden: int
    layers: int
    params: float
    largest: int  # parameters of the largest tensor group (the embedding / LM head)
    rows: list[dict]


def _millions(count: float) -> str:
    return f"{count / 1e6:.0f}M" if count >= 1e7 else f"{count / 1e6:.2f}M"


def curve_summary(points: list[Point]) -> list[str]:
    """Time and peak RSS per model, relative to the first (smallest) one, for both tools: flat in
    depth means time about proportional to the parameters and RSS about constant; the wide point
    shows RSS following the largest tensor group."""
    med = statistics.median
    lines = ["### size curve: each tool relative to the first model", "",
             "| hidden x layers | parameters | largest group | method | mergeflow time | time / first | parameters / first "
             "| mergeflow peak RSS | RSS / first | mergekit time | time / first | mergekit peak RSS | RSS / first "
             "| time / mergekit | RSS / mergekit |", "|" + "---|" * 15]
    first = {r["method"]: r for r in points[0].rows}
    for point in points:
        for r in point.rows:
            (ft, fm), (kt, km) = r["mergeflow"], r["mergekit"]
            (ft0, fm0), (kt0, km0) = first[r["method"]]["mergeflow"], first[r["method"]]["mergekit"]
            lines.append(
                f"| {point.hidden} x {point.layers} | {_millions(point.params)} | {_millions(point.largest)} | {r['method']} | "
                f"{med(ft):.1f} s | {med(ft) / med(ft0):.2f} | {point.params / points[0].params:.2f} | {med(fm):.0f} MB | "
                f"{med(fm) / med(fm0):.2f} | {med(kt):.1f} s | {med(kt) / med(kt0):.2f} | {med(km):.0f} MB | "
                f"{med(km) / med(km0):.2f} | {med(ft) / med(kt):.2f} | {med(fm) / med(km):.2f} |")
    return lines


def model_line(paths: dict[str, Path], hidden: int, layers: int, vocab: int, n_models: int) -> str:
    size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    return (f"hidden {hidden}, {layers} layers, vocab {vocab}: {size / 2 / 1e6:.0f}M parameters, {size / 1e6:.0f} MB per "
            f"checkpoint (bf16); base + {n_models} fine-tunes")


def parameters(hidden: int, layers: int, vocab: int) -> int:
    """Parameters of ``build``'s model (an upper bound: k and v counted as full square matrices)."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * int(hidden * 2.75))


def disk_needed(hidden: int, layers: int, vocab: int, n_models: int) -> float:
    """About the bytes one model's inputs and one output take (bf16; outputs are removed before
    each command)."""
    return parameters(hidden, layers, vocab) * 2 * (n_models + 1 + 1)


def run_point(root: Path, hidden: int, layers: int, vocab: int, args,
              reuse: tuple[list[dict], dict[str, Path]] | None) -> tuple[Point, list[str]]:
    """Build one curve model in ``root`` and run linear and ties with both tools, then remove it;
    or take ``reuse``: the table's rows and models, when they are this model."""
    if reuse is not None:
        rows, paths = reuse
        block = [f"### size curve: {model_line(paths, hidden, layers, vocab, args.models)}", "", "(the table's runs above)", ""]
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        paths = build(root, hidden, layers, vocab, args.models)
        rows = run_table(["linear", "ties"], root, paths, args.models, args.curve_repeat, args.src, None,
                         tools=("mergekit", "mergeflow"))
        block = format_rows(rows, "size curve: " + model_line(paths, hidden, layers, vocab, args.models))
        block += ["", f"load average before / after: {rows[0]['load'][0]:.2f} / {rows[0]['load'][1]:.2f}", ""]
    size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    if reuse is None:
        shutil.rmtree(root, ignore_errors=True)
    return Point(hidden, layers, size / 2, max(vocab * hidden, int(hidden * 2.75) * hidden), rows), block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="Methods of the table (default: all; --quick: linear ties).")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--models", type=int, default=2, help="Fine-tunes (besides the base).")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size-curve", nargs="*", type=int, metavar="LAYERS",
                        help="Also run linear and ties at these depths (default 9 36 72 144: about 0.1B to 1B).")
    parser.add_argument("--wide", nargs="?", const="1536x8", metavar="HIDDENxLAYERS",
                        help="Also run linear and ties on one wider model (default 1536x8).")
    parser.add_argument("--curve-repeat", type=int, default=1, help="Runs of each command per curve point.")
    parser.add_argument("--quick", action="store_true", help="Toy sizes throughout: a smoke test of this script.")
    parser.add_argument("--src", type=Path, help="Run mergeflow from this checkout (default: the installed one).")
    parser.add_argument("--compare", type=Path, help="Another mergeflow checkout run as a fourth command (before/after).")
    parser.add_argument("--results", type=Path, help="Also write the tables (markdown) to this file.")
    parser.add_argument("--workdir", type=Path, help="Where to build the checkpoints (default: a temporary folder).")
    args = parser.parse_args()
    curve = [] if args.size_curve is None else (args.size_curve or [9, 36, 72, 144])
    wide = [int(v) for v in args.wide.split("x")] if args.wide else None
    if args.quick:  # toy sizes: hidden 64, vocab 1000; depths and width scaled alike
        args.hidden, args.layers, args.vocab, args.repeat = 64, 2, 1000, 1
        curve = [max(1, n // 9 * 2) for n in curve]
        wide = [128, 2] if wide else None
    methods = args.methods or (["linear", "ties"] if args.quick else list(METHODS))
    shapes = [(args.hidden, n) for n in curve] + ([tuple(wide)] if wide else [])
    need = disk_needed(args.hidden, args.layers, args.vocab, args.models) + max(
        [disk_needed(h, n, args.vocab, args.models) for h, n in shapes], default=0)
    where = args.workdir or Path(tempfile.gettempdir())
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    print(f"needs about {need / 1e9:.1f} GB free disk in {where} ({free / 1e9:.1f} GB free); {os.cpu_count()} CPUs; "
          f"load average now {os.getloadavg()[0]:.2f}", flush=True)
    if free < need:
        sys.exit(f"not enough free disk: about {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free in {where}; "
                 "pass --workdir on a larger file system")
    lines = [f"mergeflow vs mergekit 0.1.5 vs the I/O floor: median (min-max) of {args.repeat} alternating runs, whole "
             "process wall time and peak RSS (ru_maxrss), each tool at its defaults.", ""]
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        root = Path(tmp)
        paths = build(root, args.hidden, args.layers, args.vocab, args.models)
        rows = run_table(methods, root, paths, args.models, args.repeat, args.src, args.compare)
        lines += format_rows(rows, model_line(paths, args.hidden, args.layers, args.vocab, args.models))
        lines += ["", f"load average (1 min) before / after: {rows[0]['load'][0]:.2f} / {rows[0]['load'][1]:.2f} on "
                  f"{os.cpu_count()} CPUs; ratios are only meaningful on an idle machine", ""]
        print("\n".join(lines), flush=True)
        table_rows = [r for r in rows if r["method"] in ("linear", "ties")]
        points = []
        for hidden, layers in shapes:
            same = (hidden, layers) == (args.hidden, args.layers) and len(table_rows) == 2
            point, block = run_point(root / "curve", hidden, layers, args.vocab, args, (table_rows, paths) if same else None)
            print("\n".join(block), flush=True)
            lines += block
            points.append(point)
        if points:
            summary = curve_summary(points)
            print("\n".join(summary), flush=True)
            lines += summary
    if args.results:
        args.results.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
