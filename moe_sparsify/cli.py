"""The `moe-sparsify` command line: parse flags, call `commands`, print, exit.

Results go to stdout (`--json`: one JSON object), logs and progress to
stderr. Exit codes: 0 success, 2 usage or config error, 1 failed run, 128 + the
signal when stopped by one (130: Ctrl-C); errors are one line naming the fix
(MOE_SPARSIFY_TRACEBACK=1 shows the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from typer.core import TyperGroup

from . import __version__
from .aliases import model_aliases
from .choices import DEFAULT_SKIP_QUANTILE
from .config import Settings, resolve_settings
from .errors import FailedRun, MoeSparsifyError, UsageError, first_line
from .plan import load_plan
from .progress import stderr

TRACEBACK_HINT = "Errors are one line; set MOE_SPARSIFY_TRACEBACK=1 to see the full traceback."


class OneLineUsageErrors(TyperGroup):
    """Usage errors (a bad flag value, an unknown option) as one `error:` line and exit 2, like every
    other error, instead of typer's boxed panel. Help (--help, no arguments) prints as usual."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            code = _fail_line("aborted", 1)
        except Exception as exc:
            # typer keeps click private; its usage errors are the exceptions with these two members.
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()
                code = exc.exit_code
            else:
                context = getattr(exc, "ctx", None)
                where = f"; see {context.command_path} --help" if context is not None else ""
                code = _fail_line(" ".join(exc.format_message().split()) + where, exc.exit_code)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _fail_line(message: str, code: int) -> int:
    # One line whatever the message holds: a wrapped library error (transformers' run over several)
    # must not break a pipeline's `2>&1 | tail -1` or a CI log grep.
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return code


app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: options with their types and defaults, no boxes
    help="Slim Mixture-of-Experts language models: prune experts exactly, skip experts at run time, compare.",
    epilog="Run `moe-sparsify COMMAND --help` for a command's options. Defaults shown there are the built-in"
    " ones; a model alias (models.yaml) and a --config file override them, and flags override both. " + TRACEBACK_HINT,
)

_DEFAULTS = Settings()


def _shown(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


@functools.cache
def _aliases_for_help() -> dict[str, dict]:
    """models.yaml, read once per process: typer evaluates every option's help text (each a string
    annotation) each time it builds the command, which re-read and re-parsed the file ~80 times a build."""
    return model_aliases()


def default_of(setting: str) -> str:
    """`[default: X]` for a help text: the built-in value, and any model alias in configs/models.yaml that
    sets its own (tiny runs 256-token sequences, not 2048)."""
    shown = _shown(getattr(_DEFAULTS, setting))
    by_alias = [f"{alias}: {entry[setting]}" for alias, entry in _aliases_for_help().items() if setting in entry]
    return f"[default: {shown}{'; ' + ', '.join(by_alias) if by_alias else ''}]"


def setting_help(text: str, setting: str) -> str:
    return f"{text} {default_of(setting)}"


def whole_number(text: str | int) -> int:
    """An integer flag takes digits only: `--keep 6.0` or `--samples 1e3` is refused, not rounded (typer's
    own parsing takes 6.0 as 6, while a settings file's `keep: 6.0` is an error)."""
    if isinstance(text, int):
        return text
    if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
        raise typer.BadParameter(f"{text!r} is not a whole number")
    return int(text)


def int_option(*names: str, **options) -> object:
    return typer.Option(*names, parser=whole_number, metavar="<int>", **options)


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", help=setting_help("Alias (in models.yaml: tiny, mixtral, ...), model directory or hub id.", "model")
    ),
]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option(
        "--config",
        help="Settings in YAML, a file or a shipped example by name (tiny-keep6); flags override it. [default: none]",
    ),
]
CalibOpt = Annotated[
    Optional[str],
    typer.Option(
        "--calibration",
        help=setting_help("Text source: bundled, bundled:heldout, a file, hf:NAME, a mix a=0.7,b=0.3.", "calibration"),
    ),
]
SamplesOpt = Annotated[Optional[int], int_option("--samples", help=setting_help("Calibration sequences.", "samples"))]
SeqLenOpt = Annotated[
    Optional[int], int_option("--seq-len", help=setting_help("Tokens per calibration sequence.", "seq_len"))
]
SeedOpt = Annotated[
    Optional[int],
    int_option(
        "--seed", help=setting_help("Seed for drawing calibration sequences (and the random strategy).", "seed")
    ),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help=setting_help("auto (cuda if present), cpu, cuda or cuda:N.", "device"))
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype", help=setting_help("auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.", "dtype")
    ),
]
BatchOpt = Annotated[
    Optional[int], int_option("--batch-size", help=setting_help("Sequences per forward pass.", "batch_size"))
]
OverwriteOpt = Annotated[
    Optional[bool], typer.Option("--overwrite", help=setting_help("Replace an existing output.", "overwrite"))
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout (progress stays on stderr). [default: off]")
]
StreamOpt = Annotated[
    Optional[bool],
    typer.Option("--stream", help=setting_help("Load one decoder layer at a time from disk (large models).", "stream")),
]
ThresholdsOpt = Annotated[
    Optional[Path],
    typer.Option("--thresholds", help="Router-threshold file from skip-profile: skip experts. [default: none]"),
]
FromCalibrationOpt = Annotated[
    Optional[str],
    typer.Option(
        "--from-calibration",
        help="Directory written by `calibrate`: reuse its tokens and block inputs (--calibration, --samples "
        "and --seq-len are then not used). [default: none, sample now]",
    ),
]


def output_option(default: str) -> object:
    return typer.Option("--output", "-o", help=f"Where to write. [default: {default}]")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moe-sparsify {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    pass


def _fail(message: str, code: int) -> None:
    raise typer.Exit(_fail_line(message, code))


class Terminated(FailedRun):
    """SIGTERM or SIGHUP, raised where the program is so that every `finally` removes its temporaries."""

    def __init__(self, signum: int):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; temporary files were removed, and rerunning resumes where it can")
        self.exit_code = 128 + signum


_TERMINATING = (signal.SIGTERM, signal.SIGHUP)
# The signal being handled: library code on the way up may turn our exception into another one
# (torch does, inside storage code), and the user must still hear why the run stopped.
_received: list[int] = []


def _terminate(signum, frame) -> None:
    for sig in _TERMINATING:  # a second signal must not interrupt the cleanup the first one started
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    raise Terminated(signum)


@contextmanager
def _signals_unwind():
    """A terminating signal unwinds the stack like an exception instead of killing the process mid-write;
    Ctrl-C raises KeyboardInterrupt, whatever handler the console script set for start-up (`launch`)."""
    handlers = {**{sig: _terminate for sig in _TERMINATING}, signal.SIGINT: signal.default_int_handler}
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unwinding_on_signals(fn, *args, **kwargs):
    _received.clear()
    try:
        with _signals_unwind():
            return fn(*args, **kwargs)
    except Exception as exc:
        if _received and not isinstance(exc, Terminated):
            raise Terminated(_received[0]) from exc
        raise


def _traceback_wanted() -> bool:
    """MOE_SPARSIFY_TRACEBACK=1 (or true, yes); 0, false, no or empty keep errors to one line."""
    return os.environ.get("MOE_SPARSIFY_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off")


def _stdout_failure(exc: BaseException) -> str:
    """Why stdout took no output, and stdout pointed at /dev/null: the interpreter's last flush at exit
    would otherwise fail again and print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):  # stdout closed or None
        pass
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is closed"
    return f"cannot write to stdout ({reason}); check where it is redirected"


def reporting_errors(fn):
    """Known errors become one line and their exit code; anything else one line and 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return _unwinding_on_signals(fn, *args, **kwargs)
        except MoeSparsifyError as exc:
            if _traceback_wanted():
                raise
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; temporary files were removed, and rerunning resumes where it can", 130)
        except Exception as exc:
            if _traceback_wanted():
                raise
            name, detail = type(exc).__name__, first_line(exc)  # first_line falls back to the name
            what = name if detail == name else f"{name}: {detail}"
            _fail(f"{what} (set MOE_SPARSIFY_TRACEBACK=1 for the traceback)", 1)

    return wrapper


# Command parameters that are not run settings.
_NOT_SETTINGS = {"config", "json_out", "plan", "thresholds"}


def _settings(config: Optional[Path], params: dict) -> Settings:
    """Settings from a command's parameters (pass `locals()` first thing: parameter names are setting names)."""
    return resolve_settings(config, {k: v for k, v in params.items() if k not in _NOT_SETTINGS})


# Set by `main`: the console script owns its process's logging; an embedding program or a test keeps its own.
_quiet_libraries = False


def _commands():
    """The commands, imported when one runs: they bring torch and transformers (~2 s), which `--help`, a bad
    flag or a bad settings file never need, so those answer at once."""
    from . import commands

    if _quiet_libraries:
        _quiet_library_warnings()
    return commands


def _is_main() -> bool:
    from .distributed import is_main

    return is_main()


def _emit(result: dict, as_json: bool, summary) -> None:
    if not _is_main():  # under torchrun, rank 0 speaks for all
        return
    if as_json:
        try:
            sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
            sys.stdout.flush()
        except (OSError, AttributeError, ValueError) as exc:  # a full device, a closed stdout
            written = result.get("output") or result.get("plan")
            done = f"the run finished and wrote {written}, but " if written else ""
            raise FailedRun(done + _stdout_failure(exc)) from None
    else:
        summary(result)


def _show_progress() -> bool:
    """Progress goes to stderr whatever the output format (stdout may be JSON); under torchrun, rank 0's."""
    return _is_main()


def _layers_table(result: dict) -> None:
    table = Table(title=f"{result['model']}: keep {result['keep']} ({result['strategy']}, {result['mode']})")
    for column in ("layer", "kept experts", "loss", "runner-up loss", "subsets"):
        table.add_column(column, justify="right")
    for lp in result["layers"]:
        runner_up = "-" if lp["runner_up_loss"] is None else f"{lp['runner_up_loss']:.4g}"
        table.add_row(
            str(lp["layer"]), " ".join(map(str, lp["kept"])), f"{lp['loss']:.4g}", runner_up, str(lp["subsets_scored"])
        )
    stderr.print(table)
    for change in result.get("config_changes", []):
        stderr.print(f"config: {change}")
    where = result["output"] or result["plan"]
    stderr.print(f"wrote {where} in {result['timings']['total_s']:.1f} s")


@app.command()
@reporting_errors
def calibrate(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    output: Annotated[Optional[str], output_option("MODEL-calibration")] = None,
    calibration: CalibOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = None,
    overwrite: OverwriteOpt = None,
    json_out: JsonOpt = False,
    stream: StreamOpt = None,
):
    """Store MoE block inputs once, for several prunes.

    `prune --from-calibration DIR` then skips sampling and the forward passes that produce each block's inputs.
    """
    settings = _settings(config, locals())
    result = _commands().calibrate(settings, _show_progress())
    _emit(
        result,
        json_out,
        lambda r: stderr.print(f"wrote {r['output']}: {r['manifest']['tokens']} tokens in {r['seconds']:.1f} s"),
    )


@app.command()
@reporting_errors
def prune(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    output: Annotated[Optional[str], output_option("MODEL-keepK, or MODEL-keepK.plan.yaml with --plan-only")] = None,
    calibration: CalibOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = None,
    overwrite: OverwriteOpt = None,
    json_out: JsonOpt = False,
    keep: Annotated[
        Optional[int], int_option("--keep", help="Experts each MoE layer keeps (required, here or in --config).")
    ] = None,
    strategy: Annotated[
        Optional[str],
        typer.Option(
            "--strategy",
            help=setting_help(
                "auto (exhaustive, or greedy past --max-subsets), exhaustive, greedy, e2e, e2e-fast, reap, frequency "
                "or random.",
                "strategy",
            ),
        ),
    ] = None,
    mode: Annotated[
        Optional[str],
        typer.Option(
            "--mode",
            help=setting_help(
                "layerwise (the paper's default), progressive (pruned inputs, own output) or compensating "
                "(pruned inputs, the original model's output: the paper's progressive).",
                "mode",
            ),
        ),
    ] = None,
    recover: Annotated[
        Optional[str],
        typer.Option(
            "--recover",
            help="After each layer's search, re-fit kept weights to the original output: any of merge (removed "
            "experts averaged into kept ones), router, refit, comma-separated, applied in that order (each kept "
            "only if held-back calibration tokens improve). [default: none]",
        ),
    ] = None,
    plan_only: Annotated[
        Optional[bool],
        typer.Option("--plan-only", help=setting_help("Write the plan file, not a checkpoint.", "plan_only")),
    ] = None,
    from_calibration: FromCalibrationOpt = None,
    max_subsets: Annotated[
        Optional[int],
        int_option(
            "--max-subsets", help=setting_help("Subsets per layer beyond which auto turns greedy.", "max_subsets")
        ),
    ] = None,
    beam: Annotated[Optional[int], int_option("--beam", help=setting_help("Greedy beam width.", "beam"))] = None,
    stream: StreamOpt = None,
):
    """Choose the experts each layer keeps; write the checkpoint.

    With --plan-only, write only the plan file (for `export`, or `eval --plan`).
    """
    settings = _settings(config, locals())
    _emit(_commands().prune(settings, _show_progress()), json_out, _layers_table)


VERIFY = "The export is checked on verify_samples calibration sequences:"


@app.command()
@reporting_errors
def export(
    plan: Annotated[Path, typer.Option("--plan", help="Plan file written by `prune --plan-only`. [required]")],
    model: Annotated[
        Optional[str], typer.Option("--model", help="The model the plan prunes. [default: the plan's source]")
    ] = None,
    config: ConfigOpt = None,
    output: Annotated[Optional[str], output_option("MODEL-keepK")] = None,
    calibration: Annotated[
        Optional[str], typer.Option("--calibration", help=setting_help(VERIFY + " Their text source.", "calibration"))
    ] = None,
    seq_len: Annotated[
        Optional[int], int_option("--seq-len", help=setting_help(VERIFY + " Their length in tokens.", "seq_len"))
    ] = None,
    seed: Annotated[
        Optional[int], int_option("--seed", help=setting_help(VERIFY + " The seed that draws them.", "seed"))
    ] = None,
    dtype: DtypeOpt = None,
    overwrite: OverwriteOpt = None,
    json_out: JsonOpt = False,
    thresholds: ThresholdsOpt = None,
):
    """Write the slimmed checkpoint for a plan file.

    The checkpoint is reloaded and checked against the source model on a few calibration sequences before it
    is put in place. With --thresholds, the thresholds are checked against the pruned model and copied beside it.
    """
    if model is None:
        model = load_plan(plan).source
    settings = _settings(config, locals())
    result = _commands().export(settings, plan, thresholds)
    _emit(
        result,
        json_out,
        lambda r: stderr.print(
            f"wrote {r['output']} ({', '.join(r['config_changes'])}) in {r['seconds']:.1f} s; "
            f"max logit diff {r['verified_max_abs_logit_diff']:.2g}"
            + (f"; copied the thresholds {r['thresholds']} beside it" if r.get("thresholds") else "")
        ),
    )


@app.command("eval")
@reporting_errors
def eval_(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
    text: Annotated[
        Optional[str], typer.Option("--text", help=setting_help("Text source perplexity is measured on.", "eval_text"))
    ] = None,
    plan: Annotated[
        Optional[Path], typer.Option("--plan", help="Apply a plan in memory instead of exporting. [default: none]")
    ] = None,
    window: Annotated[
        Optional[int], int_option("--window", help=setting_help("Tokens per scoring window.", "eval_window"))
    ] = None,
    stride: Annotated[
        Optional[int], int_option("--stride", help=setting_help("Tokens between window starts.", "eval_stride"))
    ] = None,
    perplexity: Annotated[
        Optional[bool],
        typer.Option(
            "--perplexity/--no-perplexity",
            help=setting_help("Measure perplexity (skip it to run only --tasks).", "perplexity"),
            show_default=False,
        ),
    ] = None,
    thresholds: ThresholdsOpt = None,
    tasks: Annotated[
        Optional[str],
        typer.Option("--tasks", help=setting_help("lm-eval tasks, comma-separated (bundled: pydoc_cloze).", "tasks")),
    ] = None,
    task_dir: Annotated[
        Optional[list[str]],
        typer.Option("--task-dir", help=setting_help("Directory of lm-eval task YAML (repeatable).", "task_dirs")),
    ] = None,
    num_fewshot: Annotated[
        Optional[int], int_option("--num-fewshot", help="Few-shot examples per task. [default: the task's own]")
    ] = None,
    limit: Annotated[
        Optional[int], int_option("--limit", help="Documents per task, for quick runs. [default: all]")
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Compare the VARIANTS given as arguments (MODEL, MODEL+skip, MODEL+FILE). [default: off]"
        ),
    ] = False,
    variants: Annotated[
        Optional[list[str]], typer.Argument(help="With --compare: the variants, first = baseline.", metavar="VARIANTS")
    ] = None,
    report: Annotated[
        Optional[Path], typer.Option("--report", help="With --compare: write JSON and charts here. [default: none]")
    ] = None,
    batch: Annotated[
        Optional[str],
        typer.Option(
            "--batch",
            help=setting_help("With --compare: batch sizes to time, e.g. 1,8 (first = headline).", "speed_batch"),
        ),
    ] = None,
    prompt_len: Annotated[
        Optional[int], int_option("--prompt-len", help=setting_help("With --compare: prompt tokens.", "prompt_len"))
    ] = None,
    new_tokens: Annotated[
        Optional[int],
        int_option("--new-tokens", help=setting_help("With --compare: tokens generated.", "new_tokens")),
    ] = None,
    repeats: Annotated[
        Optional[int],
        int_option(
            "--repeats", help=setting_help("With --compare: timed rounds at least (after a warm-up).", "repeats")
        ),
    ] = None,
    time_budget: Annotated[
        Optional[float],
        typer.Option(
            "--time-budget",
            help=setting_help(
                "With --compare: seconds of further rounds while the speed-ups' intervals are wider than 10 %.",
                "speed_budget_s",
            ),
        ),
    ] = None,
    card: Annotated[
        bool,
        typer.Option("--card", help="Record the result in the exported model's README.md (model card). [default: off]"),
    ] = False,
):
    """Perplexity, lm-eval tasks, or --compare of several variants.

    The model may be the original, an exported checkpoint, or one with a plan applied in memory, each with or
    without expert skipping. --compare measures quality, speed and memory of variants in one run.
    """
    flags = {"model": model, "device": device, "dtype": dtype, "eval_text": text, "eval_window": window}
    flags["perplexity"] = perplexity
    speed = {"speed_batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}
    speed["speed_budget_s"] = time_budget
    harness = {"tasks": tasks, "task_dirs": task_dir, "num_fewshot": num_fewshot, "task_limit": limit}
    settings = _settings(config, {**flags, "eval_stride": stride, **speed, **harness})
    if compare or variants:
        if not compare or plan or thresholds or model or card:
            raise UsageError(
                "variants as arguments go with --compare only (MODEL, MODEL+skip, MODEL+FILE), and --compare "
                "takes no --plan, --thresholds, --model or --card; see moe-sparsify eval --help"
            )
        _emit(_commands().compare(settings, variants or [], report, _show_progress()), json_out, _compare_table)
        return
    _emit(_commands().evaluate(settings, plan, thresholds, card, _show_progress()), json_out, _eval_summary)


def _eval_summary(r: dict) -> None:
    what = f"{r['model']}{' + ' + r['plan'] if r['plan'] else ''}{' + skipping' if r['thresholds'] else ''}"
    if "perplexity" in r:
        stderr.print(
            f"{what}: perplexity {r['perplexity']:.3f} on {r['tokens']} tokens of {r['text']} "
            f"(window {r['window']}, stride {r['stride']}, {r['device']}, {r['dtype']})"
        )
    for task, metrics in r.get("harness", {}).get("tasks", {}).items():
        stderr.print(f"{what} {task}: {_metrics(metrics)}")


def _number(value) -> str:
    """Counts as integers (`sample_len 50`), scores with four decimals."""
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {_number(v)}" for k, v in metrics.items())


def _speedup(row: dict, kind: str) -> str:
    """`1.12x (1.08-1.15)`: the median speed-up over rounds and its interval."""
    low, high = row[f"{kind}_speedup_interval"]
    return f"{row[f'{kind}_speedup']:.2f}x ({low:.2f}-{high:.2f})"


def _compare_table(result: dict) -> None:
    setup = result["setup"]
    headline = result["noise"][str(setup["batch"])]
    table = Table(
        title=f"{setup['device']}, {setup['dtype']}, {setup['threads']} threads; perplexity on {setup['text']}; "
        f"speed: batch {setup['batch']}, prompt {setup['prompt_len']}, {setup['new_tokens']} new tokens, "
        f"median of {headline['rounds']} rounds (interval: {100 * headline['interval_coverage']:.0f} % "
        f"confidence){'; NOISY, see the warnings' if headline['noisy'] else ''}"
    )
    columns = ("variant", "experts", "params M", "perplexity", "prefill tok/s", "decode tok/s")
    for column in (*columns, "prefill speed-up", "decode speed-up", "skip"):
        table.add_column(column, justify="right")
    for r in result["variants"]:
        skipped = r.get("skip_fraction")
        share = f"{100 * sum(skipped.values()) / len(skipped):.0f}%" if skipped else "-"
        table.add_row(
            r["variant"],
            str(r["experts"]),
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['perplexity']:.2f}",
            f"{r['prefill_tokens_per_s']:.0f}",
            f"{r['decode_tokens_per_s']:.1f}",
            _speedup(r, "prefill"),
            _speedup(r, "decode"),
            share,
        )
    stderr.print(table)
    for extra in setup["batches"][1:]:
        speedups = ", ".join(f"{r['variant']} {_speedup(r['speed'][str(extra)], 'decode')}" for r in result["variants"])
        stderr.print(f"decode speed-up at batch {extra}: {speedups}")
    for r in result["variants"]:
        for task, metrics in r.get("harness", {}).get("tasks", {}).items():
            stderr.print(f"{r['variant']} {task}: {_metrics(metrics)}")
    if result.get("report"):
        stderr.print(f"report: {', '.join(result['report'].values())}")


@app.command("skip-profile")
@reporting_errors
def skip_profile(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    output: Annotated[Optional[str], output_option("MODEL-thresholds.json")] = None,
    calibration: CalibOpt = None,
    samples: SamplesOpt = None,
    seq_len: SeqLenOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: BatchOpt = None,
    overwrite: OverwriteOpt = None,
    json_out: JsonOpt = False,
    plan: Annotated[
        Optional[Path], typer.Option("--plan", help="Profile the model as this plan prunes it. [default: none]")
    ] = None,
    from_calibration: FromCalibrationOpt = None,
    skip_rule: Annotated[
        Optional[str],
        typer.Option("--rule", help="ratio (top-2, the paper) or tail (top-k). [default: ratio for top-2, else tail]"),
    ] = None,
    quantile: Annotated[
        Optional[float],
        typer.Option(
            "--quantile", help=f"beta = this quantile of the rule's statistic. [default: {DEFAULT_SKIP_QUANTILE}]"
        ),
    ] = None,
    target_skip: Annotated[
        Optional[float],
        typer.Option(
            "--target-skip", help="Share of expert evaluations to skip, instead of --quantile. [default: none]"
        ),
    ] = None,
):
    """Per-layer router thresholds for dynamic expert skipping.

    Writes a threshold file for `eval --thresholds` and `export --thresholds`.
    """
    settings = _settings(config, locals())
    result = _commands().skip_profile(settings, plan, _show_progress())
    _emit(result, json_out, _thresholds_table)


def _thresholds_table(result: dict) -> None:
    stat = result["statistic"]
    table = Table(title=f"{result['model']}: {result['rule']} rule, {stat['kind']} {stat['value']}")
    for column in ("layer", "beta", "skipped pairs"):
        table.add_column(column, justify="right")
    for entry in result["layers"]:
        table.add_row(str(entry["layer"]), f"{entry['beta']:.4f}", f"{100 * entry['skip_fraction']:.1f} %")
    stderr.print(table)
    stderr.print(f"wrote {result['output']} in {result['seconds']:.1f} s")


def main() -> None:
    global _quiet_libraries
    _quiet_libraries = True
    try:
        app()
    except OSError as exc:  # help or the version printed to a full device: commands report their own
        sys.exit(_fail_line(_stdout_failure(exc), 1))


def _quiet_library_warnings() -> None:
    """Libraries' warnings (a config's token id outside its vocabulary, a quantization_config passed
    twice) would print lines around the one error line and the results. transformers logs them
    (TRANSFORMERS_VERBOSITY=warning shows them again), others use Python's warnings (PYTHONWARNINGS or
    -W show them again)."""
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    if not sys.warnoptions:
        import warnings

        warnings.simplefilter("ignore")


if __name__ == "__main__":
    main()
