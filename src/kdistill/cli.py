"""The ``kdistill`` command. Imports stay lazy so ``--help`` and config errors answer fast."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from kdistill.errors import KdistillError

if TYPE_CHECKING:
    from kdistill.config import RunConfig


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``kdistill demo: error: argument --labeled: ...``)
    instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _whole_number(low: int, high: Callable[[], int] | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in low..high() (``high`` is called only when a value
    is given, so ``--help`` imports nothing to know it)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        top = high() if high is not None else None
        if value < low or (top is not None and value > top):
            bounds = f"at least {low}" if top is None else f"between {low} and {top}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return convert


def _max_seed() -> int:
    from kdistill.settings import MAX_SEED

    return MAX_SEED


def _max_threads() -> int:
    from kdistill.settings import MAX_THREADS

    return MAX_THREADS


def _run_name(text: str) -> str:
    """An argparse type: a run name, which names a folder (no path separators)."""
    from kdistill.settings import RUN_NAME_PATTERN

    if not re.match(RUN_NAME_PATTERN, text) or len(text) > 255:
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder name: use letters, digits, "
                                         "'.', '_' and '-', starting with a letter or digit")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kdistill", description="Distil a large teacher model into a small, fast student.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the embedded offline demo on digits")
    demo.add_argument("--quick", action="store_true", help="a reduced run (for tests)")
    demo.add_argument("--labeled", type=_whole_number(1), default=50,
                      help="labels the student sees")
    demo.add_argument("--seed", type=_whole_number(0, _max_seed), default=0)
    demo.add_argument("--output", default="runs", help="folder for run outputs")
    demo.add_argument("--name", type=_run_name, default="demo",
                      help="run name (sub-folder of --output)")
    demo.add_argument("--threads", type=_whole_number(1, _max_threads), default=1,
                      help="torch CPU threads for training and latency (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    run = commands.add_parser("run", help="run a YAML config")
    run.add_argument("config", help="path to the YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a field, e.g. trainer.epochs=3")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in its folder from its newest intact checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in the run's folder (once the new one has "
                            "started)")

    check = commands.add_parser(
        "check", help="validate a YAML config: its data, models, taps and a trial step on a "
                      "few samples, without training")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE")

    cache = commands.add_parser(
        "cache", help="run a config's frozen teacher once over its training data and store "
                      "what the recipe reads (teacher.cache), without training the student")
    cache.add_argument("config")
    cache.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a field, e.g. teacher.cache=PATH")

    layermap = commands.add_parser(
        "layermap", help="measure how alike each student layer is to each teacher layer "
                         "(linear CKA) and propose a layer map for layer-to-layer distillation")
    layermap.add_argument("config")
    layermap.add_argument("--samples", type=_whole_number(2), default=256,
                          help="training inputs to compare the layers on (default 256)")
    layermap.add_argument("--output", metavar="PNG", help="also write a heat map to this PNG")
    layermap.add_argument("--set", dest="overrides", action="append", default=[],
                          metavar="KEY=VALUE")

    predict = commands.add_parser(
        "predict", help="label texts with the student of a finished text run")
    predict.add_argument("run_dir", help="the run's folder (output_dir/name)")
    predict.add_argument("texts", nargs="*", help="texts to label")
    predict.add_argument("--file", help="a UTF-8 file of texts, one per non-empty line")
    predict.add_argument("--json", action="store_true",
                         help="one JSON object per text, with every class probability")

    generate = commands.add_parser(
        "generate", help="continue a prompt with the student of a finished language-model run")
    generate.add_argument("run_dir", help="the run's folder (output_dir/name)")
    generate.add_argument("prompt", help="the text to continue")
    generate.add_argument("--max-new-tokens", type=_whole_number(1), default=64,
                          help="at most this many new tokens (default 64)")
    generate.add_argument("--temperature", type=_non_negative, default=0.0,
                          help="0: greedy (default); above: sample from softmax(z / T)")
    generate.add_argument("--seed", type=_whole_number(0, _max_seed), default=0,
                          help="seed of the sampling (default 0)")

    lifelong = commands.add_parser(
        "lifelong", help="run an L2KD config: tasks learnt one after another, each from its own "
                         "teacher, with the matrix of what the student keeps of earlier tasks")
    lifelong.add_argument("config")

    commands.add_parser("recipes", help="list the registered recipes")
    return parser


def _non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _generate(args: argparse.Namespace) -> int:
    from kdistill.models.lm_export import continue_text, load_lm_run

    model, tokenizer = load_lm_run(args.run_dir)
    print(continue_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                        args.seed))
    return 0


def _lifelong(args: argparse.Namespace) -> int:
    from kdistill.lifelong import describe
    from kdistill.lifelong_run import load_l2kd_config, run_l2kd_config

    print(describe(run_l2kd_config(load_l2kd_config(args.config))))
    return 0


def _read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.file is not None:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise KdistillError(f"--file: cannot read {args.file}: {error}") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise KdistillError("predict: give texts as arguments or a file of texts with --file")
    return texts


def _predict(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from kdistill.models.export import load_run_student
    from kdistill.predict import predict_texts

    model, meaning = load_run_student(args.run_dir)
    for prediction in predict_texts(model, _read_texts(args), meaning):
        if args.json:
            print(json.dumps(asdict(prediction)))
            continue
        label = prediction.label
        shown = " ".join(label) if isinstance(label, list) else (
            f"{label:.4g}" if isinstance(label, float) else label)
        confidence = (f"\t{max(prediction.probabilities.values()):.3f}"
                      if prediction.probabilities else "")
        print(f"{shown}{confidence}\t{prediction.text}")
    return 0


def _recipes() -> int:
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table

    from kdistill.recipes import RECIPES

    rows = [(e.name, e.summary, e.paper) for e in sorted(RECIPES.values(), key=lambda e: e.name)]
    table = Table(title="kdistill recipes")
    for column in ("name", "summary", "paper"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # Wide enough that no cell wraps (a paper's title stays on one line, also in a pipe).
    widths = [max(cell_len(r[i]) for r in [("name", "summary", "paper"), *rows])
              for i in range(3)]
    Console(width=max(80, sum(widths) + 16)).print(table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kdistill.config import ConfigError, folder_problem
    from kdistill.demo import DEMO_RUNS, DemoOptions, run_demo

    run_dir = Path(args.output) / args.name
    for flag, path in [("--output", Path(args.output)), ("--name", run_dir),
                       *(("--name", run_dir / name) for name, _, _ in DEMO_RUNS)]:
        problem = folder_problem(path)
        if problem is not None:
            raise ConfigError(f"{flag}: {problem}")
    try:
        outcome = run_demo(DemoOptions(labeled=args.labeled, seed=args.seed, quick=args.quick,
                                       output=args.output, name=args.name,
                                       threads=args.threads, progress=not args.no_progress))
    except ConfigError as error:  # the demo's data section is built from --labeled
        if str(error).startswith("data.labeled:"):
            raise ConfigError(f"--labeled:{str(error).removeprefix('data.labeled:')}") from None
        raise
    return _print_outcome(outcome.rows, "teacher and students on the digits test set",
                          outcome.report)


def _run(args: argparse.Namespace) -> int:
    from kdistill.config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "check":
        from kdistill.run import code_running_models, preflight

        preflight(config)  # the data, the models, their taps and a trial step: no training
        unbuilt = code_running_models(config)
        note = (f" (not built, as building runs code from the model folder: "
                f"{', '.join(unbuilt)})" if unbuilt else "")
        print(f"{args.config}: valid{note}")
        return 0
    if args.command == "cache":
        return _cache(config)
    if args.command == "layermap":
        return _layermap(config, args.samples, args.output)
    from kdistill.run import run

    outcome = run(config, resume=args.resume, overwrite=args.overwrite)
    if outcome.report is None:  # another process of a multi-process run reports
        return 0
    return _print_outcome(outcome.rows, config.name, outcome.report)


def _cache(config: RunConfig) -> int:
    """Build (or reuse) the teacher cache of a config; print its size and build time."""
    from kdistill.run import build_teacher_cache

    cache = build_teacher_cache(config)
    timing = ("reused: it matches the teacher, data and taps" if cache.build_seconds is None
              else f"built in {cache.build_seconds:.1f} s")
    print(f"teacher cache {cache.path}: {cache.rows} samples, {cache.nbytes / 1e6:.2f} MB "
          f"({cache.nbytes} bytes) in {len(cache.shards)} shard(s), {cache.spec.storage()}; "
          f"{timing}")
    return 0


def _layermap(config: RunConfig, samples: int, output: str | None) -> int:
    """Print the CKA matrix of a config's student and teacher, the proposed, free and uniform
    layer maps with their total similarity; with ``output``, write the heat map there."""
    from rich.console import Console

    from kdistill.report import layer_map_table, plot_layer_map
    from kdistill.run import measure_layer_map

    if output is not None and not Path(output).parent.is_dir():
        raise KdistillError(f"--output: folder {Path(output).parent} does not exist")
    result = measure_layer_map(config, samples)
    print(f"linear CKA on {result.samples} training inputs, each model's hidden states "
          "mean-pooled over the input's real tokens: student hidden.m (rows s<m>) against "
          "teacher hidden.n (columns t<n>); * marks the proposed map")
    Console(width=max(80, 8 + 9 * result.matrix.shape[1])).print(layer_map_table(result))
    print(f"proposed map: {result.proposed}  total similarity {result.proposed_total:.3f}"
          "  (layer_map: auto; the last layer on the teacher's last)")
    print(f"free map:     {result.free}  total similarity {result.free_total:.3f}"
          "  (layer_map: auto_free)")
    print(f"uniform map:  {result.uniform}  total similarity {result.uniform_total:.3f}")
    print("(student hidden.m learns from teacher hidden.map[m]; hidden.0 is the embeddings)")
    if output is not None:
        print(f"heat map: {plot_layer_map(result, output)}")
    return 0


def _print_outcome(rows: Sequence[dict], title: str, report: object) -> int:
    """Print the comparison table and where the report was written."""
    from rich.console import Console

    from kdistill.report import results_table

    console = Console(width=160)
    console.print(results_table(rows, title=title))
    console.print(f"report: {report}")
    return 0


class _StderrHandler(logging.Handler):
    """Prints kdistill's warnings (a damaged checkpoint skipped, settings changed on resume) as
    ``kdistill: ...`` on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"kdistill: {self.format(record)}", file=sys.stderr)


def _show_warnings() -> None:
    logger = logging.getLogger("kdistill")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kdistill`` console script."""
    args = _parser().parse_args(argv)
    _show_warnings()
    try:
        if args.command == "recipes":
            return _recipes()
        if args.command == "demo":
            return _demo(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "lifelong":
            return _lifelong(args)
        return _run(args)
    except (KdistillError, FileNotFoundError) as error:
        print(f"kdistill: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
