"""The command line end to end on the bundled model, and every bad input it must refuse."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from moe_sparsify.cli import app
from moe_sparsify.distributed import process_group, world

from .conftest import Forked, save_with_tokenizer

runner = CliRunner()
FAST = ["--samples", "8", "--seq-len", "64"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_prune_tiny_json_and_reload(tmp_path):
    out = tmp_path / "tiny-keep6"
    result = run("prune", "--model", "tiny", "--keep", 6, "--output", out, "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["output"] == str(out)
    assert [len(layer["kept"]) for layer in data["layers"]] == [6, 6, 6, 6]
    assert data["verified_max_abs_logit_diff"] <= 1e-4
    assert data["peak_memory"]["cpu_rss_bytes"] > 0
    assert data["settings"]["output"] == data["output"]
    # Every timing is explained by its neighbours: the parts add up to the whole.
    t = data["timings"]
    assert t["layers_stats_s"] == pytest.approx(sum(lp["stats_seconds"] for lp in data["layers"]))
    assert t["layers_search_s"] == pytest.approx(sum(lp["search_seconds"] for lp in data["layers"]))
    assert t["layer_pass_s"] == pytest.approx(t["layers_stats_s"] + t["layers_search_s"] + t["layer_pass_other_s"])
    assert t["total_s"] == pytest.approx(t["load_and_calibration_tokens_s"] + t["layer_pass_s"] + t["write_s"])
    assert t["layer_pass_other_s"] >= 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 6
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == 6 for layer in model.model.layers)


def test_same_inputs_give_byte_identical_plans_and_tensors(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run("prune", "--model", "tiny", "--keep", 5, "--output", out, *FAST).exit_code == 0
    plans = [(o / "moe_sparsify_plan.yaml").read_bytes() for o in outs]
    assert plans[0] == plans[1]
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_only_then_export_then_eval(tmp_path, text):
    plan = tmp_path / "plan.json"
    assert run("prune", "--model", "tiny", "--keep", 4, "--plan-only", "--output", plan, *FAST).exit_code == 0
    assert json.loads(plan.read_text())["kind"] == "moe-sparsify-plan"
    result = run("export", "--plan", plan, "--output", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["config_changes"] == ["num_local_experts: 8 -> 4"]
    in_memory = json.loads(run("eval", "--model", "tiny", "--plan", plan, "--json", *text).stdout)
    exported = json.loads(run("eval", "--model", tmp_path / "out", "--json", *text).stdout)
    original = json.loads(run("eval", "--model", "tiny", "--json", *text).stdout)
    assert in_memory["perplexity"] == pytest.approx(exported["perplexity"], rel=1e-5)
    assert exported["perplexity"] > original["perplexity"]


def test_calibrate_once_prune_many(tmp_path):
    calib = tmp_path / "calib"
    assert run("calibrate", "--model", "tiny", "--output", calib, *FAST).exit_code == 0
    from_store = json.loads(
        run(
            "prune",
            "--model",
            "tiny",
            "--keep",
            6,
            "--plan-only",
            "--from-calibration",
            calib,
            "--output",
            tmp_path / "a.json",
            "--json",
        ).stdout
    )
    direct = json.loads(
        run(
            "prune", "--model", "tiny", "--keep", 6, "--plan-only", "--output", tmp_path / "b.json", "--json", *FAST
        ).stdout
    )
    assert [lp["kept"] for lp in from_store["layers"]] == [lp["kept"] for lp in direct["layers"]]
    for a, b in zip(from_store["layers"], direct["layers"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # Same inputs by either path, same bytes: the plan file and its hash.
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert from_store["plan_sha256"] == direct["plan_sha256"]


# --- bad inputs: one line, non-zero exit, nothing written ------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--keep", 9], 2, "larger than the 8 experts"),
        (["--keep", 1], 2, "smaller than top_k=2"),
        ([], 2, "--keep is required"),
        (["--keep", 6, "--strategy", "magic"], 2, "strategy: 'magic'"),
        (["--keep", 6, "--calibration", "no/such/file.txt"], 2, "is not a file"),
    ],
)
def test_bad_prune_arguments(tmp_path, args, code, fragment):
    result = run("prune", "--model", "tiny", "--output", tmp_path / "out", *args)
    assert result.exit_code == code
    assert fragment in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_missing_plan_file_is_not_found(tmp_path):
    result = run("export", "--plan", tmp_path / "nope.yaml", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "not found" in _error_line(result)


def test_missing_model_path(tmp_path):
    result = run("prune", "--model", tmp_path / "nowhere", "--keep", 6, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "not an alias" in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_non_moe_model(tmp_path):
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    save_with_tokenizer(LlamaForCausalLM(config), tmp_path / "llama")
    result = run("prune", "--model", tmp_path / "llama", "--keep", 6, "--output", tmp_path / "out")
    assert result.exit_code == 2
    line = _error_line(result)
    from moe_sparsify.adapters import supported_model_types

    assert f"'llama' is not a supported MoE architecture (supported: {', '.join(supported_model_types())})" in line
    assert "mixtral" in line and "deepseek_v3" in line
    assert not (tmp_path / "out").exists()


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("keep: 6\nkepp: 4\n")
    result = run("prune", "--model", "tiny", "--config", cfg, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "kepp: unknown setting" in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(tmp_path, random_model_dir):
    broken = shutil.copytree(random_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"{garbage")
    result = run("prune", "--model", broken, "--keep", 6, "--output", tmp_path / "out", *FAST)
    assert result.exit_code == 1
    assert "cannot load the weights" in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_mismatched_plan(tmp_path, random_model_dir):
    plan = tmp_path / "random.yaml"
    result = run("prune", "--model", random_model_dir, "--keep", 6, "--plan-only", "--output", plan, *FAST)
    assert result.exit_code == 0, result.stderr
    result = run("export", "--plan", plan, "--model", "tiny", "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "does not match this model" in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("prune", "--model", "tiny", "--keep", 6, "--output", tmp_path / "out", *FAST)
    assert result.exit_code == 2
    assert "--overwrite" in _error_line(result)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_bfloat16_search_still_verifies_in_float32(tmp_path):
    result = run(
        "prune", "--model", "tiny", "--keep", 6, "--dtype", "bfloat16", "--output", tmp_path / "o", "--json", *FAST
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified_max_abs_logit_diff"] <= 1e-4


def test_shipped_configs_are_valid():
    import yaml

    from moe_sparsify.aliases import configs_dir
    from moe_sparsify.config import resolve_settings

    shipped = [path for path in sorted(configs_dir().glob("*.yaml")) if path.name != "models.yaml"]
    assert shipped
    for path in shipped:
        written = yaml.safe_load(path.read_text())
        resolved = resolve_settings(path, {}).to_dict()
        assert {key: resolved[key] for key in written} == written, path.name  # every value taken as written


def test_skip_profile_eval_and_export_with_thresholds(tmp_path, text):
    result = run("skip-profile", "--model", "tiny", "--output", tmp_path / "t.json", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rule"] == "ratio" and len(data["layers"]) == 4
    assert all(0.2 < layer["skip_fraction"] <= 0.25 for layer in data["layers"])
    # Another statistic, another threshold file: the flag reaches the profile, and the summary names the file.
    target = run("skip-profile", "--model", "tiny", "--target-skip", 0.1, "--output", tmp_path / "t2.json", *FAST)
    assert target.exit_code == 0, target.stderr
    assert re.search(r"wrote \S+t2\.json in [0-9.]+ s", target.stderr)
    targeted = json.loads((tmp_path / "t2.json").read_text())
    assert targeted["statistic"] == {"kind": "target_skip", "value": 0.1}
    assert all(0.08 <= layer["skip_fraction"] <= 0.1 for layer in targeted["layers"])

    skipped = json.loads(run("eval", "--model", "tiny", "--thresholds", tmp_path / "t.json", "--json", *text).stdout)
    assert set(skipped["skip_fraction"]) == {"0", "1", "2", "3"}

    plan = tmp_path / "plan.yaml"
    assert run("prune", "--model", "tiny", "--keep", 6, "--plan-only", "-o", plan, *FAST).exit_code == 0
    wrong = run("export", "--plan", plan, "--thresholds", tmp_path / "t.json", "--output", tmp_path / "out")
    assert wrong.exit_code == 2
    assert "belong to another model" in _error_line(wrong)
    assert not (tmp_path / "out").exists()

    pruned_t = tmp_path / "pruned.json"
    assert run("skip-profile", "--model", "tiny", "--plan", plan, "-o", pruned_t, *FAST).exit_code == 0
    ok = run("export", "--plan", plan, "--thresholds", pruned_t, "--output", tmp_path / "out")
    assert ok.exit_code == 0, ok.stderr
    assert (tmp_path / "out" / "moe_sparsify_thresholds.json").is_file()
    assert "copied the thresholds" in ok.stderr
    in_memory = json.loads(
        run("eval", "--model", "tiny", "--plan", plan, "--thresholds", pruned_t, "--json", *text).stdout
    )
    exported = json.loads(run("eval", "--model", tmp_path / "out", "--thresholds", pruned_t, "--json", *text).stdout)
    assert in_memory["perplexity"] == pytest.approx(exported["perplexity"], rel=1e-4)
    # The in-memory reference reports what it skipped, as the exported checkpoint's skipping runtime does.
    assert set(in_memory["skip_fraction"]) == set(exported["skip_fraction"]) == {"0", "1", "2", "3"}
    for layer, fraction in exported["skip_fraction"].items():
        assert in_memory["skip_fraction"][layer] == pytest.approx(fraction, abs=0.01)


def test_skip_profile_bad_statistics(tmp_path):
    both = run("skip-profile", "--model", "tiny", "--quantile", 0.3, "--target-skip", 0.1, "-o", tmp_path / "t.json")
    assert both.exit_code == 2 and "give one statistic" in _error_line(both)
    rule = run("skip-profile", "--model", "tiny", "--rule", "sideways", "-o", tmp_path / "t.json")
    assert rule.exit_code == 2 and "skip_rule" in _error_line(rule)
    assert not (tmp_path / "t.json").exists()


def test_eval_compare_table_json_and_report(tmp_path, text):
    out = tmp_path / "keep6"
    assert run("prune", "--model", "tiny", "--keep", 6, "--output", out, *FAST).exit_code == 0
    assert run("skip-profile", "--model", out, "-o", out / "moe_sparsify_thresholds.json", *FAST).exit_code == 0
    args = [
        "eval",
        "--compare",
        "tiny",
        out,
        f"{out}+skip",
        "--repeats",
        1,
        "--new-tokens",
        4,
        "--prompt-len",
        16,
        "--batch",
        "1,2",
        *text,
        "--time-budget",
        0,
    ]
    result = run(*args, "--report", tmp_path / "report", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    # One round cannot show its own noise: flagged in the JSON and on stderr, even with --json.
    assert data["noisy"] and data["noise"]["1"]["rounds"] == 1
    assert "warning: batch 1: " in result.stderr and "rests on a single round" in result.stderr
    assert [v["experts"] for v in data["variants"]] == [8, 6, 6]
    base, pruned = data["variants"][:2]
    # One round: a speed-up is the ratio of the variant's rate to the baseline's in that round.
    assert pruned["decode_speedup"] == pytest.approx(pruned["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    assert data["variants"][1]["perplexity"] > data["variants"][0]["perplexity"]
    assert set(data["variants"][2]["skip_fraction"]) == {"0", "1", "2", "3"}
    assert data["setup"]["device"] == "cpu" and data["setup"]["repeats"] == 1
    assert all(set(v["speed"]) == {"1", "2"} for v in data["variants"])
    base2, skipped2 = data["variants"][0]["speed"]["2"], data["variants"][2]["speed"]["2"]
    assert skipped2["prefill_speedup"] == pytest.approx(
        skipped2["prefill_tokens_per_s"] / base2["prefill_tokens_per_s"]
    )
    for name in (
        "comparison.json",
        "quality_vs_parameters.png",
        "speedup.png",
        "kept_experts.png",
        "skip_fractions.png",
    ):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_eval_compare_bad_variants(tmp_path):
    one = run("eval", "--compare", "tiny")
    assert one.exit_code == 2 and "at least two variants" in _error_line(one)
    missing = run("eval", "--compare", "tiny", "tiny+skip")
    assert missing.exit_code == 2 and "no threshold file" in _error_line(missing)


def test_lm_eval_task_runs_offline_through_the_harness(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")
    plan = tmp_path / "plan.yaml"
    # A plan from more text than FAST's: with FAST's, this keep-4 model happened to score the unpruned one's acc.
    assert run("prune", "--model", "tiny", "--keep", 4, "--plan-only", "-o", plan, "--samples", 16).exit_code == 0
    scores = {}
    for extra in ([], ["--plan", plan]):
        result = run(
            "eval", "--model", "tiny", "--tasks", "pydoc_cloze", "--limit", 100, "--no-perplexity", "--json", *extra
        )
        assert result.exit_code == 0, result.stderr
        harness = json.loads(result.stdout)["harness"]
        assert harness["limit"] == 100 and harness["lm_eval"]
        scores[bool(extra)] = harness["tasks"]["pydoc_cloze"]["acc"]
    assert scores[False] > 0.35  # four choices: chance is 0.25
    assert scores[False] != scores[True]  # the harness scored the pruned in-memory model
    assert not _harness_log().exists()  # a finished run leaves nothing behind


def _harness_log():
    import tempfile

    return Path(tempfile.gettempdir()) / f"moe-sparsify-lm-eval-{os.getpid()}.log"


@pytest.mark.parametrize("failure", ["harness", "signal", "ctrl-c"])
def test_a_failed_harness_keeps_its_output_and_names_it_and_a_stopped_one_keeps_nothing(monkeypatch, failure):
    from moe_sparsify import harness
    from moe_sparsify.errors import FailedRun

    class Stopped(FailedRun):  # what a signal raises (cli.Terminated), turned into another error by a library
        pass

    def simple_evaluate(**kwargs):
        print("harness progress")
        if failure == "harness":
            raise ValueError("dataset 'x' has no split 'test'")
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        try:
            raise Stopped("stopped by SIGTERM")
        except Stopped:
            raise RuntimeError("storage error while handling it") from None

    lm_eval = SimpleNamespace(simple_evaluate=simple_evaluate, __version__="0")
    monkeypatch.setattr(harness, "_lm_eval", lambda: (lm_eval, lambda **kwargs: None, None))
    expected = {"harness": FailedRun, "signal": RuntimeError, "ctrl-c": KeyboardInterrupt}[failure]
    try:
        with pytest.raises(expected) as raised:
            harness.run_tasks(None, None, ["x"], None, num_fewshot=None, limit=None, batch_size=1, device="cpu")
        if failure == "harness":
            assert str(raised.value) == (
                f"lm-eval failed on x: dataset 'x' has no split 'test'; its output is in {_harness_log()}"
            )
            assert _harness_log().read_text() == "harness progress\n"
        else:
            assert not _harness_log().exists()
    finally:
        _harness_log().unlink(missing_ok=True)


def test_tasks_alone_print_only_their_scores(tmp_path):
    """The harness's warnings, `git describe`'s "fatal: not a git repository" and tqdm bars go to its log:
    run as a user would (a real process, outside a clone), stderr holds the one summary line."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")
    args = ["eval", "--model", "tiny", "--tasks", "pydoc_cloze", "--limit", "20", "--no-perplexity"]
    done = subprocess.run([sys.executable, "-m", "moe_sparsify", *args], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert re.fullmatch(r"tiny pydoc_cloze: sample_len 20, acc [0-9.]+, acc_stderr [0-9.]+\n", done.stderr)


def test_no_perplexity_needs_tasks():
    result = run("eval", "--model", "tiny", "--no-perplexity")
    assert result.exit_code == 2 and "nothing to measure" in _error_line(result)


def test_unknown_task_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch, lm_eval_own_tasks_cut_to_hellaswag):
    import moe_sparsify.commands as commands
    import moe_sparsify.compare as compare
    from moe_sparsify.harness import task_index

    with task_index(["hellaswag"], []) as index:  # one of lm-eval's own: found once its index is read
        assert "hellaswag" in index.all_tasks

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(commands, "load_model", no_loading)
    monkeypatch.setattr(compare, "load_model", no_loading)
    result = run("eval", "--model", "tiny", "--tasks", "no_such_task")
    assert result.exit_code == 2 and "unknown lm-eval task" in _error_line(result)
    compared = run("eval", "--compare", "tiny", "tiny", "--tasks", "no_such_task")
    assert compared.exit_code == 2 and "unknown lm-eval task" in _error_line(compared)


def test_interrupted_prune_resumes_to_the_identical_plan(tmp_path, monkeypatch):
    args = ["prune", "--model", "tiny", "--keep", 5, "--mode", "progressive", "--plan-only", *FAST]
    assert run(*args, "-o", tmp_path / "whole.yaml").exit_code == 0
    out = tmp_path / "resumed.yaml"
    journal = tmp_path / "resumed.yaml.progress.json"
    monkeypatch.setenv("MOE_SPARSIFY_STOP_AFTER_LAYER", "1")
    stopped = run(*args, "-o", out)
    assert stopped.exit_code == 1 and "stopped after layer 1" in _error_line(stopped)
    assert not out.exists() and journal.exists()
    changed = run(*[a if a != 5 else 6 for a in args], "-o", out)
    assert changed.exit_code == 2 and "other settings" in _error_line(changed)
    monkeypatch.delenv("MOE_SPARSIFY_STOP_AFTER_LAYER")
    resumed = run(*args, "-o", out, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_layers"] == [0, 1]
    assert out.read_bytes() == (tmp_path / "whole.yaml").read_bytes()
    assert not journal.exists()


TORCHRUN_ARGS = ["prune", "--model", "tiny", "--keep", "5", "--plan-only", "--device", "cpu", *map(str, FAST)]


def _torchrun(tmp_path, *target: str) -> None:
    """Two gloo processes on this machine. In a session of its own, so that a launch that hangs is killed
    with its workers, not only torchrun (workers left behind would hold CPU and ports for later tests)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]
    process = subprocess.Popen(
        launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        raise AssertionError(f"torchrun did not finish in 300 s:\n{stderr[-3000:]}") from None
    assert process.returncode == 0, stderr[-3000:]


def _same_plan(single_path, two_path) -> None:
    import yaml

    single, two = (yaml.safe_load(path.read_text()) for path in (single_path, two_path))
    assert [lp["kept"] for lp in two["layers"]] == [lp["kept"] for lp in single["layers"]], two_path.name
    for a, b in zip(single["layers"], two["layers"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), two_path.name


@pytest.mark.slow  # three fresh interpreters importing torch: ~12 s on two busy cores; CI runs it with -m slow
def test_torchrun_with_two_gloo_processes_gives_the_single_process_plan(tmp_path):
    """The CLI as launched by users: `prune` joins the process group and leaves it. The forked two-rank
    tests below run the same planning over a real process group in the default run."""
    assert run(*TORCHRUN_ARGS, "-o", tmp_path / "single.yaml").exit_code == 0
    _torchrun(tmp_path, "-m", "moe_sparsify", *TORCHRUN_ARGS, "-o", str(tmp_path / "two.yaml"))
    _same_plan(tmp_path / "single.yaml", tmp_path / "two.yaml")


def _rank(rank: int, port: int, runs: list[list[str]]) -> None:
    """One of two ranks with the environment torchrun gives it, joined to the group once (through
    `process_group`, as `prune` joins it) for every run; each prune finds the group joined and shares its
    work over it. A failing run ends the rank with its exit code, leaving the group at once."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    with process_group(torch.device("cpu")):
        if world() != (rank, 2):  # else each rank would plan alone, and equal plans would prove nothing
            raise SystemExit(f"rank {rank} is not in a group of two: {world()}")
        for args in runs:
            code = app(args, standalone_mode=False)
            if code:
                raise SystemExit(code)


def _two_ranks(tmp_path_factory, runs: list[list[str]]) -> None:
    """Two gloo ranks forked from this process: what torchrun's launch adds (the launcher, an interpreter
    per rank) is the test above's; three fresh interpreters cost ~12 CPU-s of imports."""
    with socket.socket() as probe:  # a free port for rank 0's store, as torchrun --standalone picks one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [Forked(tmp_path_factory.mktemp(f"rank{r}"), _rank, r, port, runs) for r in range(2)]
    deadline = time.monotonic() + 300
    for process in ranks:
        process.wait(max(0.0, deadline - time.monotonic()))
    for process in ranks:
        if process.returncode is None:  # hung: killed with its peer, so no rank holds CPU or a port later
            process.kill()
            process.wait()
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, f"rank {rank}:\n{process.communicate()[1][-3000:]}"


@pytest.mark.parametrize(
    ("name", "extra", "config"),
    [
        ("greedy", ["--strategy", "greedy", "--mode", "progressive"], None),
        ("reap", ["--strategy", "reap"], None),
        ("e2e", ["--strategy", "e2e"], "e2e_shortlist: 4\n"),  # fewer subsets re-scored: a quarter of the time
        # Racing looks at per-sequence divergences gathered from the ranks, every batch of one process.
        ("e2e-race", ["--strategy", "e2e"], "e2e_shortlist: 4\ne2e_race_z: 0.5\n"),
    ],
    ids=["greedy", "reap", "e2e", "e2e-race"],
)
def test_two_ranks_share_every_strategy_and_mode_to_the_single_process_plan(
    tmp_path, tmp_path_factory, name, extra, config
):
    """Greedy (removal losses), REAP (routing counts and saliency), e2e (divergences) and its race
    (per-sequence divergences) reduce other sums over ranks than the exhaustive search: the same decisions
    and losses as one process."""
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        extra = [*extra, "--config", str(tmp_path / "c.yaml")]
    result = run(*TORCHRUN_ARGS, *extra, "-o", tmp_path / f"{name}-single.yaml")
    assert result.exit_code == 0, result.stderr
    _two_ranks(tmp_path_factory, [[*TORCHRUN_ARGS, *extra, "-o", str(tmp_path / f"{name}-two.yaml")]])
    _same_plan(tmp_path / f"{name}-single.yaml", tmp_path / f"{name}-two.yaml")


def test_interrupted_calibrate_resumes_to_the_same_store(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    assert run("calibrate", "--model", "tiny", "-o", tmp_path / "whole", *FAST).exit_code == 0
    monkeypatch.setenv("MOE_SPARSIFY_STOP_AFTER_LAYER", "1")
    stopped = run("calibrate", "--model", "tiny", "-o", tmp_path / "resumed", *FAST)
    assert stopped.exit_code == 1 and "stopped after layer 1" in _error_line(stopped)
    assert not (tmp_path / "resumed").exists()
    changed = run("calibrate", "--model", "tiny", "-o", tmp_path / "resumed", "--seed", 7, *FAST)
    assert changed.exit_code == 2 and "other tokens" in _error_line(changed)
    monkeypatch.delenv("MOE_SPARSIFY_STOP_AFTER_LAYER")
    resumed = run("calibrate", "--model", "tiny", "-o", tmp_path / "resumed", "--json", *FAST)
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_layers"] == [0, 1]
    for layer in range(4):
        a, b = (load_file(tmp_path / d / f"layer_{layer:03d}.safetensors")["moe_input"] for d in ("whole", "resumed"))
        assert torch.equal(a, b)
    assert (tmp_path / "whole" / "manifest.json").read_text() == (tmp_path / "resumed" / "manifest.json").read_text()
    assert not list(tmp_path.glob(".resumed*"))


def test_outputs_follow_the_umask(tmp_path):
    """A checkpoint is served or uploaded by others: under umask 022 every file written is world-readable."""
    old = os.umask(0o022)
    try:
        assert run("prune", "--model", "tiny", "--keep", 6, "--output", tmp_path / "keep6", *FAST).exit_code == 0
        assert run("calibrate", "--model", "tiny", "--output", tmp_path / "calib", *FAST).exit_code == 0
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written)
    assert any(p.parent.name == "calib" and p.suffix == ".safetensors" for p in written)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o644, path
