"""Hostile input: every refusal is one `error:` line, the right exit code, no traceback, and nothing
left on disk. Most cases fail in the pre-flight, before a model is loaded; they run in-process.
Locks and signals need real processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_sparsify.cli import app
from moe_sparsify.errors import FailedRun, UsageError
from moe_sparsify.outputs import remove_stale_temporaries, write_atomically, writing

from .conftest import Forked

FAST = ["--samples", "4", "--seq-len", "64"]
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def refused(directory: Path, *args, code: int = 2) -> str:
    """Run the CLI; assert it refuses with one line and `code`, and leaves `directory` as it was."""
    before = _listing(directory)
    result = _run(*args)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert _listing(directory) == before, _listing(directory) ^ before
    return lines[0]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Commands without --output write into the working directory: make it the test's."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """A good plan for the bundled model, to break in the tests below."""
    path = tmp_path_factory.mktemp("plan") / "tiny.plan.json"
    result = _run("prune", "--model", "tiny", "--keep", 6, "--plan-only", "--output", path, *FAST)
    assert result.exit_code == 0, result.stderr
    return path


def _write(path: Path, data) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- calibration and evaluation text -------------------------------------------------------------

BAD_TEXT = [
    ("binary.txt", b"\xff\xfe\x00\x81text", "is not UTF-8 text"),
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), "is not UTF-8 text"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("broken.json", "[1, 2", "is not valid JSON"),
    ("mapping.json", '{"rows": 3}', "expected a JSON list"),
    ("no_text.jsonl", '{"body": "a"}\n', "needs a string field 'text'"),
    ("corrupt.parquet", b"PAR1 this is not parquet", "cannot read"),
    ("empty.txt", "", "holds no text"),
    ("blank.txt", "  \n\n", "holds no text"),
]


@pytest.mark.parametrize(("name", "content", "fragment"), BAD_TEXT, ids=[c[0] for c in BAD_TEXT])
def test_bad_calibration_text(tmp_path, name, content, fragment):
    source = _write(tmp_path / name, content)
    out = tmp_path / "p.yaml"
    line = refused(tmp_path, "prune", "--keep", 6, "--plan-only", "-o", out, "--calibration", source, *FAST)
    assert fragment in line


@pytest.mark.parametrize(("name", "content", "fragment"), BAD_TEXT[:3], ids=[c[0] for c in BAD_TEXT[:3]])
def test_bad_evaluation_text(tmp_path, name, content, fragment):
    assert fragment in refused(tmp_path, "eval", "--text", _write(tmp_path / name, content))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("a.txt=-1", "weights must be positive"),
        ("a.txt=x", "is not a number"),
        (",", "empty calibration source"),
        ("data.csv", "is not a file"),
        ("folder.txt", "is not a file"),
    ],
)
def test_bad_calibration_specs(tmp_path, spec, fragment):
    (tmp_path / "folder.txt").mkdir()
    assert fragment in refused(tmp_path, "calibrate", "-o", tmp_path / "c", "--calibration", spec, *FAST)


# --- settings files and flags ------------------------------------------------------------------------


# Nine levels of nine aliases: 9^9 values when expanded, a few lists as loaded; its full repr would not end.
ALIAS_BOMB = (
    "a: &a [1,1,1,1,1,1,1,1,1]\n"
    + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    + "keep: *i\n"
)


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        ("output: 42\n", "output: Input should be a valid string (got 42)"),
        ('plan_only: "no"\n', "plan_only: Input should be a valid boolean (got 'no')"),
        ("calibration:\n  source: bundled\n  weight: 1\n", "calibration: give a source"),
        ("- keep\n- 6\n", "must be a mapping"),
        ("keep: [6\n", "is not valid YAML"),
        ("keep: 6\nkepp: 4\n", "kepp: unknown setting"),
        ("keep: 6\nsamples: -3\nseed: x\n", "samples: Input should be greater than or equal to 1 (got -3); seed:"),
        ("keep: 6\nmode: sideways\n", "mode: 'sideways' is not one of 'layerwise', 'progressive' or 'compensating'"),
        ("keep: 6\nsamples: 4\nkeep: 4\n", "key 'keep' appears again on line 3; keep one"),
        (f"keep: 6\nseed: {2**70}\n", "seed: Input should be less than 4294967296"),
        ("keep: 6\nspeed_budget_s: .inf\nquantile: .nan\n", "quantile: Input should be a finite number (got nan)"),
        ("keep: 6\nrecover: router,router\n", "recover: 'router' is named twice"),
        ("keep: 6\noutput: ''\n", "output: String should have at least 1 character"),
        ("keep: 6\nmodel: {path: tiny}\n", "model: Input should be a valid string"),
        ("keep: 6\ncalibration: [{source: bundled, weight: .nan}]\n", "weights must be positive finite numbers"),
        ("\ufeffkeep: 6\nsamples: 0\n", "samples: Input should be greater than or equal to 1"),  # a BOM is fine
        ("<<: {keep: 6, samples: 0}\n", "samples: Input should be greater than or equal to 1"),  # merge keys read
        ("base: &b {keep: 6}\n<<: *b\nkeep: 4\nbeam: 0\n", "base: unknown setting"),  # overriding a merged key
        ("Keep: 6\n", "Keep: unknown setting in"),
        pytest.param(
            "keep: 6\nmodel: " + "[" * 3000 + "]" * 3000 + "\n", "nests deeper than Python's recursion limit", id="deep"
        ),
        pytest.param(ALIAS_BOMB, "keep: Input should be a valid integer (got [[[...], [...], [...], ", id="alias bomb"),
    ],
)
def test_bad_settings_files(tmp_path, yaml_text, fragment):
    config = _write(tmp_path / "run.yaml", yaml_text)
    assert fragment in refused(tmp_path, "prune", "--config", config)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [  # round 3's probe: these already held; kept so that they keep holding
        (["prune", "--model", "-", "--keep", 6], "model '-' is not an alias"),
        (["prune", "--model", "~/no-such-model", "--keep", 6], "is not an alias"),
        (["prune", "--model", "a\nb", "--keep", 6], "is not an alias"),
        (["prune", "--model", "/dev/null", "--keep", 6], "is not an alias"),
        (["prune", "--keep", 6, "--calibration", "/dev/null", *FAST], "is not a file"),
        (["prune", "--keep", 6, "--from-calibration", "/dev/null", "--plan-only"], "is not a calibration directory"),
        (["prune", "--", "--keep", 6], "unexpected extra argument"),
        (["prune", "--keep", 6, "--seed", -1], "seed: Input should be greater than or equal to 0"),
        (["export", "--plan", "-"], "plan - not found"),
        (["eval", "--thresholds", "."], "is not a regular file"),
        (
            ["eval", "--compare", "tiny", "tiny", "--report", "/dev/null"],
            "--report /dev/null is a FIFO, socket or device",
        ),
    ],
)
def test_paths_and_values_that_already_held(tmp_path, args, fragment):
    assert fragment in refused(tmp_path, *args)


def test_a_python_tag_in_settings_is_refused_not_run(tmp_path):
    config = _write(tmp_path / "run.yaml", "keep: !!python/object/apply:os.system ['touch pwned']\n")
    assert "is not valid YAML" in refused(tmp_path, "prune", "--config", config)
    assert not (tmp_path / "pwned").exists()


def test_a_key_in_the_wrong_case_is_pointed_to_its_setting(tmp_path):
    config = _write(tmp_path / "run.yaml", "Keep: 6\nplan_Only: true\n")
    line = refused(tmp_path, "prune", "--config", config)
    assert "Keep: unknown setting" in line and "(did you mean keep?)" in line and "did you mean plan_only?" in line


def test_a_plan_given_as_the_settings_file_is_named_as_such(tmp_path, plan_file):
    assert "is a moe-sparsify-plan file, not settings" in refused(tmp_path, "prune", "--config", plan_file, "--keep", 6)


def test_binary_and_missing_settings_files(tmp_path):
    binary = _write(tmp_path / "run.yaml", b"\xff\xfe\x00keep")
    assert "is not valid YAML" in refused(tmp_path, "prune", "--config", binary, "--keep", 6)
    assert "cannot read config" in refused(tmp_path, "prune", "--config", tmp_path / "none.yaml", "--keep", 6)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["prune", "--keep", 6, "--seed", "abc"], "Invalid value for '--seed': 'abc' is not a whole number"),
        (["prune", "--keep", "six"], "Invalid value for '--keep'"),
        (["prune", "--kep", 6], "No such option: --kep"),
        (["prune", "--keep", 6, "--seq-len", 4096], "--seq-len 4096 exceeds the model's max_position_embeddings 1024"),
        (["calibrate", "--seq-len", 2048], "max_position_embeddings 1024"),
        (["eval", "--window", 4096], "--window 4096 exceeds the model's max_position_embeddings 1024"),
        (["prune", "--keep", 6, "--samples", 0], "samples: Input should be greater than or equal to 1"),
        (["prune", "--keep", 6, "--device", "gpu"], "device: must be one of auto, cpu, cuda or cuda:N"),
        (["prune", "--keep", 6, "--dtype", "float8"], "dtype: 'float8' is not one of"),
        (["prune", "--keep", 6, "--strategy", "magic"], "strategy: 'magic' is not one of"),
        (["skip-profile", "--quantile", 2], "quantile: Input should be less than 1"),
        (["skip-profile", "--quantile", 0.5, "--target-skip", 0.3], "give one statistic, not both"),
        (["skip-profile", "--rule", "median"], "skip_rule: 'median' is not one of"),
        (["eval", "stray", "words"], "variants as arguments go with --compare only"),
        (["eval", "--compare", "tiny"], "needs at least two variants"),
        (["eval", "--batch", "1,x"], "speed_batch: must be positive integers"),
        (["eval", "--window", 8, "--stride", 16], "eval_stride: 16 is not smaller than eval_window 8"),
        (["prune", "--model", "no/such/model", "--keep", 6], "not an alias"),
        (["nonsense"], "No such command 'nonsense'"),
        (["export", "-o", "out"], "Missing option '--plan'"),
        (["prune", "--keep", 6, "--batch-size", 0], "batch_size: Input should be greater than or equal to 1"),
        (["prune", "--keep", 6, "--max-subsets", -1, "--beam", 0], "max_subsets: Input should be greater"),
        (["prune", "--keep", 6, "--plan-only", "-o", "."], "is or holds"),
        (["calibrate", "-o", "..", "--overwrite"], "is or holds"),
        (["eval", "--task-dir", "missing"], "task_dirs.0: missing is not a directory"),
        (["eval", "--compare", "tiny", "tiny", "--time-budget", "inf"], "speed_budget_s: Input should be a finite"),
        (["skip-profile", "--target-skip", "nan"], "target_skip: Input should be a finite number"),
        (["prune", "--keep", 6, "--seed", 2**64], "seed: Input should be less than 4294967296"),
        (["prune", "--keep", 6, "--plan-only", "-o", ""], "output: String should have at least 1 character"),
        (["eval", "--text", ""], "eval_text: String should have at least 1 character"),
        (["calibrate", "--calibration", "a.txt=nan"], "weights must be positive finite numbers"),
        (["calibrate", "--calibration", "a.txt=inf,b.txt=1"], "weights must be positive finite numbers"),
        (["prune", "--keep", 6, "--recover", "router,refit,router"], "recover: 'router' is named twice"),
        (["calibrate", "--samples", 10**9, "--seq-len", 64], "lower --samples or --seq-len"),  # not "free space"
        (["prune", "--keep", "6.0"], "Invalid value for '--keep': '6.0' is not a whole number"),  # not rounded to 6
        (["calibrate", "--samples", "1e3"], "'1e3' is not a whole number"),
        (["eval", "--tasks", "pydoc_cloze", "--limit", 0], "task_limit: Input should be greater than or equal to 1"),
        (["prune", "--keep", 8, *FAST], "--keep 8 keeps all 8 experts per layer, which prunes nothing; choose 2..7"),
        (["eval", "--compare", "tiny", "tiny", "--prompt-len", 1000], "--prompt-len plus --new-tokens 1032 exceeds"),
        (["eval", "--compare", "tiny", "tiny", "--window", 2048], "--window 2048 exceeds"),
        (["eval", "--compare", "tiny", "tiny+"], "variant 'tiny+' names nothing after '+'"),  # was the plain model
        (["eval", "--text", "hf:"], "text source 'hf:' names no dataset; write hf:NAME"),
        (["eval", "--text", "/dev/null"], "text source '/dev/null' is not a file (--calibration, --text)"),
        (["calibrate", "--calibration", "hf::en@train"], "names no dataset"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, args, fragment):
    assert fragment in refused(tmp_path, *args)


# --- outputs: pre-flight before the model loads ----------------------------------------------------


def test_missing_parent_directory_is_refused_before_loading(tmp_path, monkeypatch):
    import moe_sparsify.commands as commands

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(commands, "load_model", no_loading)
    monkeypatch.setattr(commands, "_open_model", no_loading)
    for args in (
        ["prune", "--keep", 6, "-o", tmp_path / "no" / "out", *FAST],
        ["prune", "--keep", 6, "--plan-only", "-o", tmp_path / "no" / "p.yaml", *FAST],
        ["calibrate", "-o", tmp_path / "no" / "c", *FAST],
        ["skip-profile", "-o", tmp_path / "no" / "t.json", *FAST],
    ):
        assert "does not exist; create it or choose another --output" in refused(tmp_path, *args)


def test_an_output_holding_the_model_is_refused_even_with_overwrite(tmp_path, random_model_dir):
    model = random_model_dir.resolve()
    for args in (
        ["prune", "--model", model, "--keep", 6, "-o", model.parent, "--overwrite"],
        ["calibrate", "--model", model, "-o", model, "--overwrite", *FAST],
        ["prune", "--model", model, "--keep", 6, "-o", model / "inside", *FAST],
    ):
        line = refused(model.parent, *args)
        assert "is or holds" in line or "this run reads" in line


def _calibration_directory(directory: Path) -> Path:
    """Enough of a stored calibration for --from-calibration: the output is refused before its layers are read."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir()
    _write(directory / "manifest.json", {"kind": "moe-sparsify-calibration"})
    save_file({"token_ids": torch.zeros(4, 8, dtype=torch.long)}, directory / "tokens.safetensors")
    return directory


def test_an_output_that_is_or_lies_inside_what_the_run_reads_is_refused(tmp_path, plan_file, random_model_dir):
    plan = _write(tmp_path / "plan.json", plan_file.read_text())
    stored = _calibration_directory(tmp_path / "calib")
    text = _write(tmp_path / "a.txt", "some text")
    model = random_model_dir.resolve()
    for args, fragment in [
        (["skip-profile", "--plan", plan, "-o", plan, "--overwrite"], "is one of the inputs this run reads"),
        (["export", "--plan", plan, "-o", plan, "--overwrite"], "is one of the inputs this run reads"),
        (["calibrate", "--calibration", text, "-o", tmp_path, "--overwrite"], "is or holds"),
        (["prune", "--keep", 6, "--plan-only", "--from-calibration", stored, "-o", stored / "manifest.json"], "inside"),
        (["prune", "--model", model, "--keep", 6, "--plan-only", "-o", model / "config.json", "--overwrite"], "inside"),
        (["eval", "--compare", "tiny", model, "--report", model], "is one of the inputs this run reads"),
        (["eval", "--compare", "tiny", model, "--report", model / "report"], "inside"),
    ]:
        assert fragment in refused(tmp_path, *args), args
    assert json.loads(plan.read_text()) == json.loads(plan_file.read_text())


def test_a_threshold_file_may_be_written_and_replaced_beside_the_model_it_profiles(tmp_path, random_model_dir):
    """Inside the model directory, where `MODEL+skip` finds it: a new file, or one that is a threshold file."""
    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    for overwrite in ([], ["--overwrite"]):
        result = _run("skip-profile", "--model", model, "-o", model / "moe_sparsify_thresholds.json", *overwrite, *FAST)
        assert result.exit_code == 0, result.stderr


def test_a_broken_symbolic_link_as_output_is_named(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert "is a broken symbolic link" in refused(tmp_path, "prune", "--keep", 6, "-o", tmp_path / "link", *FAST)


def test_parent_that_is_a_file(tmp_path):
    _write(tmp_path / "file", "x")
    assert "is not a directory" in refused(tmp_path, "prune", "--keep", 6, "-o", tmp_path / "file" / "out")


def test_unwritable_parent(tmp_path, monkeypatch):
    import moe_sparsify.outputs as outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # root ignores chmod
    line = refused(tmp_path, "prune", "--keep", 6, "--plan-only", "-o", tmp_path / "p.yaml")
    assert "cannot write in" in line and "read-only or no permission" in line


def test_output_of_the_wrong_kind_is_refused_even_with_overwrite(tmp_path):
    _write(tmp_path / "file", "mine")
    (tmp_path / "dir").mkdir()
    line = refused(tmp_path, "prune", "--keep", 6, "-o", tmp_path / "file", "--overwrite", *FAST)
    assert "is a file, but this writes a directory" in line
    line = refused(tmp_path, "prune", "--keep", 6, "--plan-only", "-o", tmp_path / "dir", "--overwrite", *FAST)
    assert "is a directory, but this writes a file" in line
    assert "is a directory" in refused(tmp_path, "skip-profile", "-o", tmp_path / "dir", "--overwrite", *FAST)
    assert "is a file" in refused(tmp_path, "calibrate", "-o", tmp_path / "file", "--overwrite", *FAST)
    assert (tmp_path / "file").read_text() == "mine"


def test_an_output_that_is_a_fifo_is_refused_even_with_overwrite(tmp_path):
    """`-o /dev/null --overwrite` as root would have replaced the device by a plan file."""
    os.mkfifo(tmp_path / "fifo")
    for args in (["skip-profile", *FAST], ["prune", "--keep", 6, "--plan-only"]):
        line = refused(tmp_path, *args, "-o", tmp_path / "fifo", "--overwrite")
        assert "is a FIFO, socket or device, not a file or directory" in line
    assert (tmp_path / "fifo").is_fifo()


def test_an_output_name_too_long_for_its_temporaries_is_refused_before_loading(tmp_path):
    """250 bytes fit the file system, `.NAME.partial-PID` beside it does not: the run would fail at its
    first write, after the search."""
    line = refused(tmp_path, "prune", "--keep", 6, "--plan-only", "-o", tmp_path / ("x" * 250), *FAST)
    assert "the name is 250 bytes" in line and "choose a shorter name" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_on_a_file_system_that_refuses_new_files_is_refused(tmp_path):
    """/proc passes access() for root, and then refuses every new file: as the output, and as the
    directory activations spill to (which failed after the model loaded)."""
    line = refused(tmp_path, "prune", "--keep", 6, "--plan-only", "-o", "/proc/plan.json", *FAST)
    assert "cannot create files in /proc" in line
    config = _write(tmp_path / "spill.yaml", "offload_dir: /proc\nactivations_cpu_gb: 0\n")
    line = refused(tmp_path, "prune", "--keep", 6, "--plan-only", "-o", tmp_path / "p.json", "--config", config)
    assert "offload_dir: cannot create files in /proc" in line


def test_existing_output_needs_overwrite(tmp_path):
    _write(tmp_path / "t.json", "{}")
    assert "pass --overwrite" in refused(tmp_path, "skip-profile", "-o", tmp_path / "t.json", *FAST)


def test_report_path_is_checked_before_measuring(tmp_path):
    _write(tmp_path / "report", "mine")
    line = refused(tmp_path, "eval", "--compare", "tiny", "tiny", "--report", tmp_path / "report")
    assert "--report" in line and "is a file" in line
    line = refused(tmp_path, "eval", "--compare", "tiny", "tiny", "--report", tmp_path / "no" / "report")
    assert "does not exist" in line


def test_a_report_without_matplotlib_is_refused_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a base install without the report extra has
    line = refused(tmp_path, "eval", "--compare", "tiny", "tiny", "--report", tmp_path / "report")
    assert "pip install 'moe-sparsify[report]'" in line


def test_too_little_free_disk_is_refused(tmp_path, monkeypatch):
    import moe_sparsify.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: _Usage(free=1024))
    line = refused(tmp_path, "prune", "--keep", 6, "-o", tmp_path / "out", *FAST, code=1)
    assert "needs at least" in line and "free some space" in line


class _Usage:
    def __init__(self, free: int):
        self.total, self.used, self.free = free, 0, free


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(FailedRun, match="no space left on the disk holding"):
        write_atomically(tmp_path / "plan.yaml", "x: 1\n")
    assert _listing(tmp_path) == set()


def test_safetensors_errors_carrying_an_os_error_are_translated(tmp_path):
    class SafetensorError(Exception):
        pass

    with pytest.raises(FailedRun, match="no space left"), writing(tmp_path / "out"):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull }) (os error 28)")
    with pytest.raises(UsageError, match="read-only file system"), writing(tmp_path / "out"):
        raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(ValueError, match="unrelated"), writing(tmp_path / "out"):
        raise ValueError("unrelated")  # not an OS error: left alone


# --- plans and threshold files ---------------------------------------------------------------------


def _edited(plan_file: Path, directory: Path, change) -> Path:
    data = json.loads(plan_file.read_text())
    change(data)
    return _write(directory / "edited.json", data)


PLAN_EDITS = [
    (lambda d: d["layers"][0].update(kept=[0.0, 1, 4, 5, 6, 7]), "layers.0.kept.0: Input should be a valid integer"),
    (lambda d: d["layers"][0].update(kept=[True, 1, 4, 5, 6, 7]), "(got True)"),
    (lambda d: d["layers"][0].update(kept=[0, 0, 4, 5, 6, 7]), "layer 0 keeps invalid experts [0, 0, 4, 5, 6, 7]"),
    (lambda d: d["layers"][0].update(kept=[-1, 1, 4, 5, 6, 7]), "keeps invalid experts"),
    (lambda d: d["layers"][0].update(kept=[3]), "keeps 1 experts, fewer than top_k=2"),
    (lambda d: d["layers"][0].update(layer=99), "layer 99 is not one of the MoE layers"),
    (lambda d: d["layers"][0].update(kept=[str(e) for e in d["layers"][0]["kept"]]), "Input should be a valid integer"),
    (lambda d: d["layers"].pop(), "is missing"),
    (lambda d: d["layers"][1].update(layer=0), "layer 0 appears 2 times"),
    (lambda d: d.update(layers=[]), "it lists no layers"),
    (lambda d: d.update(kind="moe-sparsify-thresholds"), "not a moe-sparsify plan"),
    (lambda d: d.update(schema_version=99), "schema 99 is not 1"),
    (lambda d: d["model"].update(num_experts="8"), "model.num_experts: Input should be a valid integer"),
]


@pytest.mark.parametrize(("change", "fragment"), PLAN_EDITS)
def test_malformed_plans_fail_before_loading(tmp_path, plan_file, change, fragment):
    plan = _edited(plan_file, tmp_path, change)
    assert fragment in refused(tmp_path, "export", "--plan", plan, "-o", tmp_path / "out")
    assert fragment in refused(tmp_path, "eval", "--plan", plan)
    assert fragment in refused(tmp_path, "skip-profile", "--plan", plan, "-o", tmp_path / "t.json")


def test_a_document_of_the_other_kind_is_named_as_such(tmp_path, plan_file):
    line = refused(tmp_path, "eval", "--thresholds", plan_file)
    assert "not a moe-sparsify thresholds file (it is a moe-sparsify-plan file)" in line


def test_a_plan_applies_to_its_model_loaded_in_any_precision_and_not_to_another(tmp_path, plan_file):
    """The plan was made in float32; float16 and bfloat16 round the router weights it recognises the model
    by, so the hash differs, and the router norms agree to rounding: the same model. Norms of another
    router (edited here) are refused in any precision, and so is a file written before the norms existed,
    which is pointed to the dtype it was made with."""
    for dtype in ("float16", "bfloat16"):
        done = _run("export", "--plan", plan_file, "-o", tmp_path / dtype, "--dtype", dtype, "--json")
        assert done.exit_code == 0, done.stderr
    data = json.loads(plan_file.read_text())
    assert data["model"]["router_dtype"] == "float32" and len(data["model"]["router_norms"]) == 4

    def another_router(data):
        data["model"]["router_norms"][2][0] *= 1.01

    other = _edited(plan_file, tmp_path, another_router)
    assert "router_sha256" in refused(tmp_path, "export", "--plan", other, "-o", tmp_path / "out", "--dtype", "float16")
    older = _edited(plan_file, tmp_path, lambda d: [d["model"].pop(k) for k in ("router_dtype", "router_norms")])
    line = refused(tmp_path, "export", "--plan", older, "-o", tmp_path / "out", "--dtype", "float16")
    assert "router_sha256" in line and "load it in the --dtype the file was made with" in line


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"\x00\xff\xfe", "is not valid JSON"), ("[1, 2]", "is not a mapping"), ("", "is not valid JSON")],
)
def test_plan_files_that_are_not_plans(tmp_path, content, fragment):
    plan = _write(tmp_path / "plan.json", content)
    assert fragment in refused(tmp_path, "export", "--plan", plan, "-o", tmp_path / "out")


def test_an_evaluation_text_shorter_than_one_window_is_refused_before_loading(tmp_path, monkeypatch):
    import moe_sparsify.commands as commands

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the text's length was checked")

    monkeypatch.setattr(commands, "load_model", no_loading)
    short = _write(tmp_path / "short.txt", "def f(x): return x")
    assert "fewer than one --window of 256" in refused(tmp_path, "eval", "--text", short)
    assert "fewer than one --window of 64" in refused(tmp_path, "eval", "--text", short, "--window", 64, "--stride", 32)


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    """A good calibration of the bundled model, copied and damaged by the test below."""
    path = tmp_path_factory.mktemp("calibration") / "calib"
    result = _run("calibrate", "--model", "tiny", "--output", path, *FAST)
    assert result.exit_code == 0, result.stderr
    return path


CALIBRATION_DAMAGE = [  # a damaged store is a failed read (1), as damaged weights are; a wrong directory is usage (2)
    ("truncated layer", lambda d: (d / "layer_001.safetensors").write_bytes(b"\x10\x00"), 1, "cannot read"),
    ("missing layer", lambda d: (d / "layer_002.safetensors").unlink(), 1, "has no inputs for layer 2"),
    ("missing tokens", lambda d: (d / "tokens.safetensors").unlink(), 1, "cannot read"),
    ("manifest not JSON", lambda d: (d / "manifest.json").write_text("{x"), 2, "is not a calibration directory"),
]


@pytest.mark.parametrize(
    ("name", "damage", "code", "fragment"), CALIBRATION_DAMAGE, ids=[c[0] for c in CALIBRATION_DAMAGE]
)
def test_a_damaged_calibration_directory_exits_like_a_damaged_checkpoint(
    tmp_path, calibration_dir, name, damage, code, fragment
):
    store = shutil.copytree(calibration_dir, tmp_path / "calib")
    damage(store)
    line = refused(
        tmp_path, "prune", "--keep", 6, "--from-calibration", store, "--plan-only", "-o", tmp_path / "p.json", code=code
    )
    assert fragment in line, line


def test_missing_plan_and_calibration_directory(tmp_path):
    assert "none.yaml not found" in refused(tmp_path, "export", "--plan", tmp_path / "none.yaml")
    line = refused(tmp_path, "prune", "--keep", 6, "--from-calibration", tmp_path, "-o", tmp_path / "out")
    assert "is not a calibration directory" in line


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d["layers"][0].update(beta="0.5"), "layers.0.beta: Input should be a valid number"),
        (lambda d: d["layers"].pop(), "it lists 3 layers, and its model has 4 MoE layers"),
        (lambda d: d["layers"][0].update(beta=7.0), "beta 7.0 is not in [0, 1]"),
        (lambda d: d.update(rule="median"), "rule 'median' is not one of ratio, tail"),
        (lambda d: d.update(statistic={"kind": "mean"}), "statistic {'kind': 'mean'} is not"),
        (lambda d: d["layers"][1].update(layer=0), "name a layer more than once"),
    ],
)
def test_malformed_threshold_files(tmp_path, change, fragment):
    layers = [{"layer": i, "beta": 0.5, "skip_fraction": 0.25} for i in range(4)]
    model = {"model_type": "mixtral", "num_experts": [8] * 4, "top_k": 2, "router_sha256": "ab"}
    data = {"kind": "moe-sparsify-thresholds", "schema_version": 1, "model": model, "rule": "ratio"}
    data.update(statistic={"kind": "quantile", "value": 0.5}, layers=layers, calibration={})
    change(data)
    thresholds = _write(tmp_path / "t.json", data)
    assert fragment in refused(tmp_path, "eval", "--thresholds", thresholds)


# --- locks, signals and the temporaries of killed runs ---------------------------------------------


@pytest.fixture
def cli(tmp_path_factory):
    """Start `moe-sparsify ARGS` as its own process; its output is kept outside the test's directory."""
    return lambda *args: Forked(tmp_path_factory.mktemp("logs"), app, [str(a) for a in args])


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}"
    stale.mkdir()
    probe = tmp_path / f".out.probe-{dead.stdout.strip()}"  # the pre-flight's, left by a SIGKILL
    probe.touch()
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a live process's: not ours to remove
    alive.mkdir()
    assert remove_stale_temporaries(out) == [stale, probe]
    assert alive.exists() and not stale.exists() and not probe.exists()


def _wait_for(predicate, process: Forked, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sigterm_mid_export_unwinds_and_removes_its_temporaries(tmp_path, plan_file, cli):
    process = cli("export", "--plan", plan_file, "-o", tmp_path / "out")
    _wait_for(lambda: any(tmp_path.glob(".out.partial-*")), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().startswith("error: stopped by SIGTERM") and len(stderr.strip().splitlines()) == 1
    assert _listing(tmp_path) == set()


def test_two_concurrent_runs_exactly_one_proceeds_and_a_killed_holder_is_stale(tmp_path, plan_file, cli):
    out = tmp_path / "out"
    first = cli("export", "--plan", plan_file, "-o", out)
    _wait_for(lambda: any(tmp_path.glob(".out.partial-*")), first)  # the first run holds the lock and writes
    # Frozen while it holds the lock: a tiny export could otherwise finish before the second run starts,
    # which would then meet an existing output instead of a live lock.
    os.kill(first.pid, signal.SIGSTOP)
    second = _run("export", "--plan", plan_file, "-o", out)
    assert second.exit_code == 1
    assert f"another moe-sparsify run (PID {first.pid}) is writing {out}" in second.stderr
    first.kill()  # SIGKILL: no cleanup runs; its lock file and temporary directory stay behind
    first.wait()
    assert (tmp_path / ".out.lock").exists() and any(tmp_path.glob(".out.partial-*"))
    third = _run("export", "--plan", plan_file, "-o", out)
    assert third.exit_code == 0, third.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])


def _set_model_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "zorblax"}))


def _set_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


def _drop_tensor(model: Path, suffix: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(model / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.endswith(suffix)}, model / "model.safetensors")


def _reshape_tensor(model: Path, suffix: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(model / "model.safetensors")
    state[next(k for k in state if k.endswith(suffix))] = torch.zeros(3, 5)
    save_file(state, model / "model.safetensors")


FP8_BAD_BLOCK = {"quant_method": "fp8", "weight_block_size": "16"}
CT_UNKNOWN = {"quant_method": "compressed-tensors", "format": "zorb-quantized", "config_groups": {}}

BROKEN_MODELS = [  # (what is broken, how, exit code, the line must name)
    ("truncated weights", _truncate_weights, 1, "re-save or re-download"),
    ("config not JSON", lambda m: (m / "config.json").write_text("{not json"), 2, "not a valid JSON"),
    ("no weights", lambda m: (m / "model.safetensors").unlink(), 1, "no file named model.safetensors"),
    ("unknown model_type", _set_model_type, 2, "'zorblax', which transformers"),
    ("no tokenizer", lambda m: (m / "tokenizer.json").unlink(), 2, "holds no tokenizer"),
    ("tokenizer not JSON", lambda m: (m / "tokenizer.json").write_text("{x"), 1, "copy good tokenizer files"),
    ("config a list", lambda m: (m / "config.json").write_text("[]"), 2, "fix its config.json"),
    ("hidden_size a string", lambda m: _set_config(m, hidden_size="128"), 2, "expected int, got str (value: '128')"),
    ("a router weight missing", lambda m: _drop_tensor(m, "layers.1.block_sparse_moe.gate.weight"), 1, "lacks 1"),
    ("an expert of the wrong shape", lambda m: _reshape_tensor(m, "experts.0.w1.weight"), 1, "equal size"),
    ("quantization_config a string", lambda m: _set_config(m, quantization_config="fp8"), 2, "not a mapping"),
    ("fp8 block size a string", lambda m: _set_config(m, quantization_config=FP8_BAD_BLOCK), 2, "weight_block_size"),
    ("unknown compressed format", lambda m: _set_config(m, quantization_config=CT_UNKNOWN), 2, "does not define"),
    ("an expert weight missing", lambda m: _drop_tensor(m, "experts.3.w2.weight"), 1, "down_proj MISMATCH"),
    ("top-k zero", lambda m: _set_config(m, num_experts_per_tok=0), 2, "needs 1 <= top-k <= experts"),
    ("top-k above the experts", lambda m: _set_config(m, num_experts_per_tok=9), 2, "8 experts per MoE layer and 9"),
    ("a negative expert count", lambda m: _set_config(m, num_local_experts=-8), 2, "fix its config.json"),
]


@pytest.mark.parametrize(("name", "damage", "code", "fragment"), BROKEN_MODELS, ids=[c[0] for c in BROKEN_MODELS])
def test_a_broken_model_directory_is_one_line_naming_the_fix(tmp_path, name, damage, code, fragment):
    from moe_sparsify.models import bundled_model_dir

    model = tmp_path / "model"
    shutil.copytree(bundled_model_dir("tiny"), model)
    damage(model)
    line = refused(
        tmp_path, "prune", "--model", model, "--keep", 6, "--plan-only", "-o", tmp_path / "p.json", *FAST, code=code
    )
    assert fragment in line, line


# --- torchrun: a process joins the process group once --------------------------------------------


def _join_twice(rank: int, port: int) -> None:
    """One torchrun rank (its environment as torchrun sets it) that joins the group, leaves, and joins again."""
    import torch

    from moe_sparsify.distributed import process_group, world

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    with process_group(torch.device("cpu")):
        assert world()[1] == 2  # else the second join below would be no join at all
    try:
        with process_group(torch.device("cpu")):
            print("rejoined", flush=True)
    except UsageError as exc:
        print("refused:", exc, flush=True)


def test_a_second_join_of_the_process_group_is_refused_not_hung(tmp_path):
    """Two real gloo ranks join, leave, and try again: each must refuse at once in one line. Without the
    guard both re-join (this test then sees `rejoined`), or one waits for the other for 30 minutes."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs = [tmp_path / f"rank{r}" for r in range(2)]
    ranks = []
    for rank, log in enumerate(logs):
        log.mkdir()
        ranks.append(Forked(log, _join_twice, rank, port))
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    for (stdout, stderr), rank in zip(outputs, ranks):
        assert rank.returncode == 0, stderr
        assert stdout.strip().startswith("refused: this process already took part"), stdout
        assert len(stdout.strip().splitlines()) == 1


STREAMED_BROKEN = [  # --stream reads the checkpoint itself, not through transformers' loader
    ("a router weight missing", lambda m: _drop_tensor(m, "layers.1.block_sparse_moe.gate.weight"), "no router weight"),
    ("an expert weight missing", lambda m: _drop_tensor(m, "experts.3.w2.weight"), "experts.3.w2 (or down_proj)"),
    ("an expert of the wrong shape", lambda m: _reshape_tensor(m, "experts.0.w1.weight"), "differ in shape"),
]


@pytest.mark.parametrize(("name", "damage", "fragment"), STREAMED_BROKEN, ids=[c[0] for c in STREAMED_BROKEN])
def test_a_broken_checkpoint_streamed_is_one_line_naming_the_fix(tmp_path, name, damage, fragment):
    from moe_sparsify.models import bundled_model_dir

    model = tmp_path / "model"
    shutil.copytree(bundled_model_dir("tiny"), model)
    damage(model)
    args = ["prune", "--model", model, "--keep", 6, "--plan-only", "--stream", "-o", tmp_path / "p.json", *FAST]
    line = refused(tmp_path, *args, code=1)
    assert fragment in line and "re-save or re-download" in line, line


def test_a_fifo_given_as_a_settings_plan_or_threshold_file_is_refused_not_read(tmp_path):
    """Reading a FIFO blocks until a writer comes: the run would hang instead of answering."""
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert "is not a regular file" in refused(tmp_path, "prune", "--config", fifo, "--keep", 6)
    assert "is not a regular file" in refused(tmp_path, "export", "--plan", fifo, "-o", tmp_path / "out")
    assert "is not a regular file" in refused(tmp_path, "eval", "--thresholds", fifo)


def test_a_cuda_device_torch_does_not_see_is_refused(monkeypatch):
    import torch

    from moe_sparsify.models import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="torch sees 1 CUDA device"):
        pick_device("cuda:7")
    assert pick_device("cuda:0") == torch.device("cuda:0")


def _signal_while_locking(directory: Path) -> None:
    """In a process of its own (signals reach the main thread, which pytest-xdist's may not be): SIGTERM
    arrives right after the lock file is made; exits 0 if the run unwound and nothing is left."""
    from moe_sparsify.cli import Terminated, _unwinding_on_signals
    from moe_sparsify.outputs import OutputLock, holding_outputs, lock_output

    taken = OutputLock.__enter__

    def taken_then_signalled(self):
        entered = taken(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return entered

    OutputLock.__enter__ = taken_then_signalled

    @holding_outputs
    def run():
        lock_output(directory / "out")

    try:
        _unwinding_on_signals(run)
    except Terminated:
        left = _listing(directory)
        print(sorted(left))
        sys.exit(0 if not left else 3)
    sys.exit(4)  # the signal did not stop the run


def test_a_signal_while_the_lock_is_taken_leaves_no_lock_file(tmp_path):
    """SIGTERM right after the lock file is made, before its removal is registered: it waits until it is,
    then unwinds the run, and the lock file goes with it."""
    (tmp_path / "out").mkdir()
    (tmp_path / "logs").mkdir()
    child = Forked(tmp_path / "logs", _signal_while_locking, tmp_path / "out")
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, (stdout, stderr)


def test_library_warnings_do_not_add_lines_to_the_error(tmp_path, monkeypatch, capsys):
    """A config whose token ids lie outside its vocabulary makes transformers warn while reading it: the
    entry point keeps its stderr to the one error line (TRANSFORMERS_VERBOSITY=warning shows them)."""
    import logging

    from transformers.utils import logging as hf_logging

    from moe_sparsify.cli import main
    from moe_sparsify.models import bundled_model_dir

    model = tmp_path / "model"
    shutil.copytree(bundled_model_dir("tiny"), model)
    _set_config(model, bos_token_id=50256, eos_token_id=50256, num_experts_per_tok=0)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.setattr(sys, "argv", ["moe-sparsify", "prune", "--model", str(model), "--keep", "6"])
    printed = []  # what transformers' own stderr handler would print (it writes to the stream of import time)

    class Collect(logging.Handler):
        def emit(self, record):
            printed.append(record.getMessage())

    collect, level = Collect(), hf_logging.get_verbosity()
    hf_logging.get_logger("transformers").addHandler(collect)
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        hf_logging.get_logger("transformers").removeHandler(collect)
        hf_logging.set_verbosity(level)
    assert exited.value.code == 2 and printed == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs 1 <= top-k <= experts" in lines[0], lines


def test_python_warnings_are_off_in_the_command_line_unless_asked_for(monkeypatch):
    """transformers' UserWarning about a quantization_config passed twice printed two lines per export."""
    import warnings

    from moe_sparsify.cli import _quiet_library_warnings

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "warning")  # leave transformers' logger as the suite has it
    for options, shown in (([], 0), (["default"], 1)):  # -W / PYTHONWARNINGS given: the user's choice stands
        monkeypatch.setattr(sys, "warnoptions", options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _quiet_library_warnings()
            warnings.warn("a library's aside", UserWarning, stacklevel=1)
        assert len(caught) == shown


def test_a_result_that_stdout_cannot_take_is_one_line_naming_what_was_written(tmp_path, monkeypatch):
    """`--json > /dev/full`, or stdout closed: the output is in place, and the line says so."""
    import moe_sparsify.cli as cli

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            raise ValueError("not a real file")

    monkeypatch.setattr(cli, "_is_main", lambda: True)
    for stdout, reason in ((Full(), "No space left on device"), (None, "it is closed")):
        monkeypatch.setattr(sys, "stdout", stdout)
        with pytest.raises(FailedRun, match=f"wrote {tmp_path}/p.json, but cannot write to stdout \\({reason}\\)"):
            cli._emit({"output": f"{tmp_path}/p.json"}, True, print)


def test_help_printed_to_a_full_device_is_one_line(monkeypatch, capsys):
    from moe_sparsify.cli import main

    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        monkeypatch.setattr(sys, "argv", ["moe-sparsify", "prune", "--help"])
        with pytest.raises(SystemExit) as exited:
            main()
    assert exited.value.code == 1
    assert (
        capsys.readouterr().err
        == "error: cannot write to stdout (No space left on device); check where it is redirected\n"
    )


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_a_traceback_switch_set_off_keeps_errors_to_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv("MOE_SPARSIFY_TRACEBACK", value)
    assert "not found" in refused(tmp_path, "export", "--plan", tmp_path / "none.json")


def _signalled_while_importing(signum: int) -> None:
    """In a process of its own: the console script's start-up, with the command line's import replaced by
    one that receives `signum` halfway (the real import takes seconds of torch and transformers)."""
    import types

    from moe_sparsify.launch import main

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            os.kill(os.getpid(), signum)
            time.sleep(30)  # the handler ends the process before this does

    sys.modules["moe_sparsify.cli"] = Importing("moe_sparsify.cli")
    main()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_command_line_imports_is_one_line(tmp_path, signum):
    """Ctrl-C during start-up printed a KeyboardInterrupt traceback, SIGTERM killed without a word."""
    child = Forked(tmp_path, _signalled_while_importing, signum)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert stderr == f"error: stopped by {name} while starting; nothing was written\n"


def _signalled_after_the_command(signum: int) -> None:
    """In a process of its own: the console script around a command that succeeds, then `signum` arrives
    as the interpreter would tear down; exits 0 if the signal was ignored instead of ending the process."""
    import types

    from moe_sparsify.launch import main

    sys.modules["moe_sparsify.cli"] = types.SimpleNamespace(main=lambda: None)
    main()
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # a handler, or the default action, would have run by now


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_command_leaves_its_exit_code(tmp_path, signum):
    """SIGTERM a moment after `wrote ...` killed the process (status -15) with its output complete."""
    child = Forked(tmp_path, _signalled_after_the_command, signum)
    _, stderr = child.communicate(timeout=60)
    assert (child.returncode, stderr) == (0, "")
