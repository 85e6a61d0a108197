"""``memscore`` command line: ``score``, ``features``, ``finetune``, ``train-sae``, ``models``,
``verify``, ``evaluate`` and ``serve``.

The options of ``score``, ``finetune``, ``train-sae``, ``evaluate`` and ``serve`` are generated
from their config objects' fields (``ScoreConfig``, ``FinetuneConfig``, ``TrainSAEConfig``,
``EvaluateConfig``, ``ServeConfig``), so they map onto them one to one; ``job_entrypoint`` builds
the ``jobs/*.py`` scripts from the same configs. A ``MemscoreError`` (a problem the user can
fix) prints as one line and exits with 2.

The commands that start Ray (``score``, ``finetune``, ``train-sae``) print memscore's own lines
and, on a terminal, Ray Data's progress bars; Ray's log lines go to Ray's session log folder
(``/tmp/ray/session_latest/logs/``, and ``memscore-PID.log`` there for the command's own) unless
``--verbose``; ``--quiet`` leaves the final line, warnings and errors (``add_output_flags``).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

from memscore.errors import MemscoreError, counted
from memscore.evaluation.config import EvaluateConfig
from memscore.feature_analysis.config import FeaturesConfig
from memscore.finetuning.config import FinetuneConfig
from memscore.maps.config import MapsConfig
from memscore.options import add_arguments, from_args
from memscore.runtime import failures
from memscore.scoring.config import ScoreConfig
from memscore.train_sae.config import TrainSAEConfig
from memscore.training.run_folder import NOTHING_TO_DO

__all__ = [
    "main",
    "guarded",
    "add_debug_flag",
    "add_output_flags",
    "build_parser",
    "format_summary_line",
    "format_finetune_line",
    "score_command",
    "features_command",
    "finetune_command",
    "evaluate_command",
    "maps_command",
    "serve_command",
    "train_sae_command",
    "job_entrypoint",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memscore",
        description="Score image memorability with published deep models, on Ray.",
    )
    from memscore import __version__

    parser.add_argument("--version", action="version", version=f"memscore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    score = commands.add_parser(
        "score",
        help="score every image of a manifest and write Parquet with the scores",
        description="Score every row of MANIFEST and write Parquet (every manifest column, plus "
        "memscore_row, the score columns, memscore_error, memscore_model, memscore_width and "
        "memscore_height) and a run summary _memscore.json "
        "to --output. Runs on a local Ray unless --address or RAY_ADDRESS names a cluster.",
    )
    add_arguments(score, ScoreConfig)
    feats = commands.add_parser(
        "features",
        help="which filters of a model see what: top images per channel, their Spearman with "
        "the score, renderings (the ResMem paper's fig. 13-15)",
        description="Score every row of MANIFEST with --model while recording each of --layers' "
        "channels (the layer's output averaged over positions), then write to --output: "
        "top_images.parquet (the exact --top-k images of every channel), channels.parquet "
        "(each channel's mean, std and Spearman correlation with the model's score and with "
        "--truth-column), visualizations/LAYER/CHANNEL.png (renderings by activation "
        "optimization, --visualize or --channels), sheets/LAYER.png and report.md. The rows "
        "and their activations are a scoring run in OUTPUT/activations (resumable with "
        "--resume). --list-layers prints the model's layers.",
    )
    add_arguments(feats, FeaturesConfig)
    tune = commands.add_parser(
        "finetune",
        help="fine-tune a model on labelled images with Ray Train",
        description="Train --model on MANIFEST's --label-column (MSE, validation Spearman every "
        "epoch, early stopping, best epoch kept) and write the run to OUTPUT/NAME; score with "
        "the result via `memscore score ... --weights OUTPUT/NAME/best`. The same command with "
        "the same --name resumes an interrupted run.",
    )
    add_arguments(tune, FinetuneConfig)
    sae = commands.add_parser(
        "train-sae",
        help="train the memorability traces paper's sparse autoencoder with Ray Train",
        description="Compute --encoder's representation of every image of MANIFEST (the "
        "scoring job's decode stage and encoder actors), z-score them per dimension, train "
        "the paper's sparse autoencoder on them and write the run to OUTPUT/NAME; score with "
        "the result via `memscore score IMAGES --model ENCODER-sae --weights OUTPUT/NAME/best`. "
        "The same command with the same --name resumes an interrupted run.",
    )
    add_arguments(sae, TrainSAEConfig)
    listing = commands.add_parser(
        "models", help="list the registered models, their weights and licences"
    )
    listing.add_argument("--json", action="store_true", help="print the registry as JSON")
    check = commands.add_parser(
        "verify",
        help="check that an output holds every manifest row exactly once",
        description="Check that --manifest is the one the run read (its path and fingerprint; "
        "exit 1 with one line if not), then report the manifest rows missing from OUTPUT, "
        "those in it more than once, and rows in it that the manifest does not have; exit 1 "
        "if there are any.",
    )
    check.add_argument("output", help="the --output folder of a run (local or s3://)")
    check.add_argument("--manifest", required=True, help="the run's manifest")
    check.add_argument("--path-column", help="the manifest's path column (default: the run's)")
    check.add_argument(
        "--id-column",
        help="match rows by this column (default: the run's --id-column, else memscore_row)",
    )
    check.add_argument(
        "--ignore-identity",
        action="store_true",
        help="the manifest moved or was copied on purpose: skip the check that "
        "it is the run's (its path and fingerprint, as the run recorded them) "
        "and match rows by their paths instead of their positions",
    )
    check.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec/s3fs option, as for score",
    )
    evaluation = commands.add_parser(
        "evaluate",
        help="compare predictions with measured memorability: metrics, figures, a report",
        description="Join PREDICTIONS (a `memscore score` output or a table) to --truth on the "
        "image path (or --key) and write to --report: metrics.json (Spearman's rho with a "
        "bootstrap 95% interval, Pearson's r, MSE, MAE, the predictions' range, overall and "
        "per --group-by value; the split-half ceiling with --split-half-columns), "
        "distribution.png, scatter.png and report.md.",
    )
    add_arguments(evaluation, EvaluateConfig)
    drawing = commands.add_parser(
        "maps",
        help="draw a `memscore score --maps` output: overlays and a sheet",
        description="Draw the memorability maps of SCORES (a `memscore score --maps` output, "
        "local or s3://) over their photos, read again as the run read them: "
        "overlays/ROW-NAME.png for the first --limit rows (each photo at its own size, the map "
        "over the region the model saw), sheet.png (the --sheet most and least memorable "
        "images with their maps) and maps.json, into --render.",
    )
    add_arguments(drawing, MapsConfig)
    from memscore.serve.config import ServeConfig

    server = commands.add_parser(
        "serve",
        help="serve the models over HTTP on Ray Serve: a page to drop images on, POST /score",
        description="Start a web server that scores uploaded images with --model: GET / (a "
        "page), POST /score (multipart 'file' fields -> JSON), GET /healthz, GET /models, "
        "GET /metrics. Same decoding and scores as `memscore score`. Runs on a local Ray "
        "unless --address or RAY_ADDRESS names a cluster; Ctrl-C stops it.",
    )
    add_arguments(server, ServeConfig)
    for command in (score, feats, tune, sae, listing, check, evaluation, drawing, server):
        add_debug_flag(command)
    for command in (score, feats, tune, sae):
        add_output_flags(command)
    return parser


def format_summary_line(summary: dict) -> str:
    """The final line of ``memscore score``.

    Example:
        >>> format_summary_line({"rows_out": 1, "rows_scored": 1, "rows_with_errors": 0,
        ...                      "images_per_s": 0.4, "output": "scores/"})
        'memscore: 1 row, 1 scored, 0 errors, 0.4 images/s -> scores/'
        >>> format_summary_line({"rows_out": 5, "rows_scored": 4, "rows_with_errors": 1,
        ...                      "output": "scores/", "work_done": False})
        'memscore: already complete: nothing to do: 5 rows, 4 scored, 1 error -> scores/'
    """
    skipped = summary.get("non_image_files_skipped")
    counts = (
        f"{counted(summary['rows_out'], 'row')}, {summary['rows_scored']} scored, "
        f"{counted(summary['rows_with_errors'], 'error')}"
    )
    if summary.get("work_done") is False:  # the old run's speed is not this command's
        return f"memscore: {NOTHING_TO_DO}: {counts} -> {summary['output']}"
    rate = summary.get("images_per_s")
    return (
        f"memscore: {counts}, {rate if rate is not None else '-'} images/s "
        + (f"({counted(skipped, 'non-image file')} skipped) " if skipped else "")
        + f"-> {summary['output']}"
    )


def format_finetune_line(summary: dict) -> str:
    """The final line of ``memscore finetune``: epochs, the best epoch and its validation
    Spearman, the test split's Spearman, the checkpoint. A Spearman that is not defined (fewer
    than 3 rows, or constant predictions) is said in words.

    Example:
        >>> format_finetune_line({"epochs_run": 1, "best": {"epoch": 0, "val_spearman": None,
        ...                       "val_rows": 2}, "test": None, "rows_per_split": {"test": 0},
        ...                       "best_checkpoint": "runs/a/best"})
        'memscore: 1 epoch, best epoch 0 (validation Spearman undefined on 2 rows), no test rows -> runs/a/best'
    """
    best = summary.get("best") or {}
    rho = best.get("val_spearman")
    validation = (
        f"validation Spearman {rho:.3f}"
        if _defined(rho)
        else "validation Spearman undefined"
        + (f" on {counted(best['val_rows'], 'row')}" if best.get("val_rows") is not None else "")
    )
    test_rows = (summary.get("rows_per_split") or {}).get("test", 0)
    test = summary.get("test")
    if test is None:
        tested = "no test rows" if not test_rows else "test split not scored"
    else:
        overall = (test.get("metrics") or {}).get("overall") or {}
        spearman = overall.get("spearman")
        tested = (
            f"test Spearman {spearman:.3f}"
            if _defined(spearman)
            else f"test Spearman undefined on {counted(overall.get('n', test_rows), 'row')}"
        )
    epoch = best.get("epoch")
    head = f"{counted(summary['epochs_run'], 'epoch')}, " + (
        f"best epoch {epoch} ({validation})" if epoch is not None else "no best epoch"
    )
    if summary.get("work_done") is False:
        head = f"{NOTHING_TO_DO}: {head}"
    return f"memscore: {head}, {tested} -> {summary['best_checkpoint']}"


def _defined(value) -> bool:
    """A metric that has a value: not None (JSON's NaN) and not NaN."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _models(args: argparse.Namespace) -> int:
    import json

    from memscore.models.registry import registry_table

    rows = registry_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        default = (
            " (default" + "".join(f", also --weights {a}" for a in row["aliases"]) + ")"
            if row["default"]
            else ""
        )
        shape = "x".join(str(n) for n in row["input_size"])
        print(
            f"{row['model']}  weights={row['weights']}{default}  "
            f"column={row['output_column']}  input={shape}"
        )
        print(f"    source:  {row['source']}")
        print(f"    licence: {row['licence']}")
        print(f"    paper:   {row['paper']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from memscore.scoring.verify import NotTheRunsManifest, verify
    from memscore.storage import absolute, parse_storage_options

    try:
        options = parse_storage_options(args.storage_options)
    except ValueError as exc:
        raise MemscoreError(str(exc)) from None
    try:
        report = verify(
            absolute(args.output),
            absolute(args.manifest),
            path_column=args.path_column,
            id_column=args.id_column,
            ignore_identity=args.ignore_identity,
            storage_options=options,
        )
    except NotTheRunsManifest as exc:  # a failed check, as a mismatch of rows is: exit 1
        print(f"memscore: verify: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the traceback of an error memscore did not anticipate."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an unexpected error, print its full traceback (and Ray's logged errors)",
    )


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` and ``--quiet``: how much of a run that starts Ray reaches the terminal
    (``failures.QUIET``, ``NORMAL``, ``VERBOSE``); a presentation choice of the command line,
    so not a field of the job's config."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=failures.VERBOSE,
        default=failures.NORMAL,
        help="also print Ray's own log lines and its workers' output, which "
        "otherwise go to Ray's session log folder (/tmp/ray/session_latest/logs/; "
        "memscore-PID.log there holds the lines this command would have printed)",
    )
    group.add_argument(
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=failures.QUIET,
        help="print only the final line, warnings and errors (no progress bars)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "models": _models,
        "verify": _verify,
        "finetune": finetune_command,
        "evaluate": evaluate_command,
        "score": score_command,
        "features": features_command,
        "maps": maps_command,
        "serve": serve_command,
        "train-sae": train_sae_command,
    }
    return guarded(commands[args.command], args)


def guarded(command, args: argparse.Namespace) -> int:
    """``command(args)``, with every error as one line on stderr instead of a traceback.

    A ``MemscoreError`` (a problem the user can fix) exits with 2; any other exception is
    named in one line by its innermost cause (``failures.describe``: a Ray task's own
    exception, not Ray's wrapper) with a pointer to ``--debug``, which re-raises it whole, and
    exits 1. SIGTERM stops a command as Ctrl-C does, with one line and exit 143 (128 + 15, a
    shell's code for a process ended by SIGTERM); Ray Data's logged tracebacks stay off the
    terminal unless ``--debug`` (``failures.command_line``).
    """
    debug = getattr(args, "debug", False)
    hint = _resume_hint(command)
    with failures.command_line(
        resume_hint=hint, debug=debug, verbosity=getattr(args, "verbosity", None)
    ):
        try:
            return command(args)
        except MemscoreError as exc:
            print(f"memscore: error: {exc}", file=sys.stderr)
            return 2
        except failures.Terminated:
            return _terminated(hint)
        except KeyboardInterrupt:
            print("memscore: interrupted", file=sys.stderr)
            return 130
        except SystemExit as exc:
            # ray.init installs its own SIGTERM handler, sys.exit(15), before it starts the
            # node: a SIGTERM in those seconds, before failures.ray_started takes SIGTERM back
            if exc.code != signal.SIGTERM:
                raise
            return _terminated(hint)
        except Exception as exc:
            if debug:
                raise
            log = failures.ray_log_path()  # where Ray logged what led up to it
            print(
                f"memscore: error: {failures.describe(exc)} "
                f"(run again with --debug for the traceback"
                + (f"; Ray's log lines: {log})" if log else ")"),
                file=sys.stderr,
            )
            return 1


def _terminated(hint: str | None) -> int:
    print("memscore: terminated (SIGTERM)" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return 128 + signal.SIGTERM


def _resume_hint(command) -> str | None:
    """What finishes ``command`` after it was stopped: scoring resumes with --resume, the
    training jobs with the same command (the same --name); the others have nothing to finish."""
    if command in (score_command, features_command):
        return "run the same command with --resume to finish it"
    if command in (finetune_command, train_sae_command):
        return "run the same command again to resume it"
    return None


def _run_job(job, config_cls, args: argparse.Namespace):
    """``job(config)`` on the parsed arguments (errors are ``guarded``'s to report)."""
    return job(from_args(args, config_cls))


def finetune_command(args: argparse.Namespace) -> int:
    """Run ``finetune`` from parsed arguments: a result line and 0, or one error line and 2."""
    from memscore.finetuning.job import finetune

    summary = _run_job(finetune, FinetuneConfig, args)
    _print_warnings(summary)
    print(format_finetune_line(summary))
    return 0


def train_sae_command(args: argparse.Namespace) -> int:
    """Run ``train_sae`` from parsed arguments: a result line and 0, or one error line and 2."""
    from memscore.train_sae.job import summary_line, train_sae

    print(summary_line(_run_job(train_sae, TrainSAEConfig, args)))
    return 0


def score_command(args: argparse.Namespace) -> int:
    """Run ``score`` from parsed arguments: the summary line and 0, or one error line and 2."""
    from memscore.scoring.job import score

    summary = _run_job(score, ScoreConfig, args)
    _print_warnings(summary)
    print(format_summary_line(summary))
    return 0


def features_command(args: argparse.Namespace) -> int:
    """Run ``features`` (or list the model's layers) from parsed arguments."""
    from memscore.feature_analysis.job import features, layers_of

    config = from_args(args, FeaturesConfig)
    if config.list_layers:
        config.validated()
        for info in layers_of(config.models[0]):
            size = "x".join(str(n) for n in info.size) if info.size else "-"
            channels = info.channels if info.channels is not None else "-"
            runs = f"\truns {info.calls} times: not a layer" if info.calls > 1 else ""
            print(f"{info.name}\t{info.kind}\tchannels={channels}\tsize={size}{runs}")
        return 0
    summary = features(config)
    shown = ", ".join(
        f"{layer} ({info['channels']} channels)" for layer, info in summary["layers"].items()
    )
    renders = summary["renderings"]
    beat = sum(1 for r in renders if r["beats_best_image"])
    print(
        f"memscore: {summary['rows_analysed']} images analysed at {shown}"
        + (
            f", {beat} of {len(renders)} renderings beat their channel's best image"
            if renders
            else ""
        )
        + f" -> {summary['output']}"
    )
    return 0


def _print_warnings(summary: dict) -> None:
    if summary.get("work_done") is False:
        return  # the finished run's, said when it ran: this command did nothing
    for warning in summary.get("warnings", []):
        print(f"memscore: warning: {warning}", file=sys.stderr)


def evaluate_command(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments: a result line and 0, or one error line and 2."""
    from memscore.evaluation.job import evaluate, summary_line

    result = _run_job(evaluate, EvaluateConfig, args)
    for warning in result["warnings"]:
        print(f"memscore: warning: {warning}", file=sys.stderr)
    print(summary_line(result))
    return 0


def maps_command(args: argparse.Namespace) -> int:
    """Run ``maps`` from parsed arguments: a result line and 0, or one error line and 2."""
    from memscore.maps.job import maps

    result = _run_job(maps, MapsConfig, args)
    missing = len(result["photos_not_read_again"])
    print(
        f"memscore: {counted(len(result['overlays']), 'overlay')} of {result['column']} "
        f"and a sheet -> {result['render']}"
        + (f" ({counted(missing, 'photo')} could not be read again)" if missing else "")
    )
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Run ``serve`` from parsed arguments until Ctrl-C: 0 once stopped, or one error line and 2."""
    from memscore.serve.config import ServeConfig
    from memscore.serve.launch import serve_forever

    return serve_forever(from_args(args, ServeConfig))


def job_entrypoint(config_cls, doc: str):
    """``(parse_args, main)`` of a Ray job script (``jobs/*.py``) for ``config_cls``'s command.

    A job script takes exactly the options of its ``memscore`` command (its parser is built
    from the same config fields) and runs the same code, so ``ray job submit -- python
    jobs/score.py ...`` and ``memscore score ...`` are one program; only the script's
    docstring, its ``--help`` text, is its own.

    Args:
        config_cls: ``ScoreConfig``, ``FeaturesConfig``, ``FinetuneConfig``,
            ``EvaluateConfig`` or ``TrainSAEConfig``.
        doc: the script's docstring; its first line is the parser's description.

    Example:
        >>> parse_args, main = job_entrypoint(ScoreConfig, "Score images.")
        >>> parse_args(["examples/images", "--output", "scores/"]).output
        'scores/'
    """
    command = {
        ScoreConfig: score_command,
        FinetuneConfig: finetune_command,
        EvaluateConfig: evaluate_command,
        TrainSAEConfig: train_sae_command,
        FeaturesConfig: features_command,
    }[config_cls]

    def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
        parser = argparse.ArgumentParser(description=doc.splitlines()[0])
        add_arguments(parser, config_cls)
        add_debug_flag(parser)
        if config_cls is not EvaluateConfig:  # the jobs that start Ray
            add_output_flags(parser)
        return parser.parse_args(argv)

    def main(args: argparse.Namespace) -> int:
        return guarded(command, args)

    return parse_args, main


if __name__ == "__main__":
    sys.exit(main())
