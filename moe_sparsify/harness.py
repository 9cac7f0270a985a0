"""Zero- and few-shot tasks through lm-evaluation-harness, on the in-memory model.

The harness gets the model object itself (`HFLM(pretrained=model)`), so what
it scores is the model as it is in memory: pruned, with a plan applied, or
with skipping on. Tasks come from the harness's registry (they need the hub
unless cached), from user task directories (`--task-dir`, YAML task files
with local data), or from the bundled offline task:

  pydoc_cloze  400 sentences of the bundled held-out split, last word removed,
               4 choices (scripts/make_pydoc_cloze.py); zero-shot accuracy.

Needs the `eval` extra: pip install 'moe-sparsify[eval]' (lm_eval, accelerate).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from .errors import FailedRun, MoeSparsifyError, UsageError, first_line

BUNDLED_TASKS = ("pydoc_cloze",)
_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(
            f"--tasks needs lm-evaluation-harness ({exc.name} is missing): pip install 'moe-sparsify[eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


def bundled_task_dir(directory: Path) -> Path:
    """Write the bundled tasks' YAML (with absolute paths to their packaged data) into `directory`."""
    for name in BUNDLED_TASKS:
        data = Path(str(resources.files("moe_sparsify") / "assets" / "tasks" / f"{name}.jsonl"))
        (directory / f"{name}.yaml").write_text(_TASK_YAML.format(name=name, data=data))
    return directory


@contextlib.contextmanager
def output_to(log: Path):
    """Send everything written to stdout and stderr, by Python or by a child process, to `log`.

    The harness logs warnings that do not apply to an in-memory model ("`pretrained` model kwarg is not
    of type `str`", "Passed an already-initialized model"), runs `git describe` (printing "fatal: not a
    git repository" outside a clone) and draws tqdm bars; stdout must stay one JSON object. Errors still
    surface: they are exceptions, reported after the streams are restored."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log, "a") as sink:
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            sink.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


@contextmanager
def task_index(tasks: list[str], task_dirs: list[Path]) -> Iterator:
    """lm-eval's task index (its own tasks, the bundled ones, --task-dir ones), open for a whole command:
    built once, since it reads thousands of YAML files (~30 s), and before any model is loaded, so an
    unknown task name is refused first."""
    _, _, TaskManager = _lm_eval()
    for task_dir in task_dirs:
        if not Path(task_dir).is_dir():
            raise UsageError(f"--task-dir {task_dir} is not a directory of lm-eval task YAML files")
    with tempfile.TemporaryDirectory() as bundled:
        include = [str(bundled_task_dir(Path(bundled)))] + [str(Path(d).resolve()) for d in task_dirs]
        # Indexing lm-eval's own ~15,000 task files takes seconds: only when a task is not ours or the user's.
        manager = TaskManager(include_path=include, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = TaskManager(include_path=include)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise UsageError(
                f"unknown lm-eval task(s) {', '.join(unknown)}; bundled: {', '.join(BUNDLED_TASKS)}, "
                "or add a --task-dir with their YAML"
            )
        yield manager


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    index,
    *,
    num_fewshot: int | None,
    limit: int | None,
    batch_size: int,
    device: str,
) -> dict:
    """{task: {metric: value}} from lm_eval.simple_evaluate, plus the harness version. `index`: an open
    `task_index` holding `tasks`."""
    lm_eval, HFLM, _ = _lm_eval()
    # The harness's output (warnings, tqdm bars, `git describe`) is kept only when the harness fails: then
    # it is the account of why, and the error names it. A finished run, a signal or Ctrl-C leave nothing.
    log = Path(tempfile.gettempdir()) / f"moe-sparsify-lm-eval-{os.getpid()}.log"
    keep_log = False
    try:
        with output_to(log):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=index, num_fewshot=num_fewshot, limit=limit, log_samples=False
            )
    except Exception as exc:
        if _raised_by_us(exc):
            raise
        keep_log = True
        raise FailedRun(f"lm-eval failed on {', '.join(tasks)}: {first_line(exc)}; its output is in {log}") from exc
    finally:
        if not keep_log:
            log.unlink(missing_ok=True)
    scores = {
        task: {k.replace(",none", ""): v for k, v in metrics.items() if isinstance(v, (int, float))}
        for task, metrics in output["results"].items()
    }
    return {
        "tasks": scores,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval": lm_eval.__version__,
    }


def _raised_by_us(exc: BaseException) -> bool:
    """Ours, or raised while handling ours: a signal's exception that library code turned into its own."""
    seen = exc
    while seen is not None:
        if isinstance(seen, MoeSparsifyError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
