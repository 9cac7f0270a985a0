"""Settings precedence and validation: every problem reported at once."""

import pytest

from moe_sparsify.config import resolve_settings
from moe_sparsify.errors import UsageError

from .conftest import settings_error


def test_flags_override_yaml_which_overrides_alias_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\nkeep: 4\nsamples: 16\nstrategy: greedy\n")
    s = resolve_settings(cfg, {"keep": 6, "seed": None})
    assert (s.keep, s.samples, s.strategy, s.seq_len) == (6, 16, "greedy", 256)  # seq_len from the tiny alias


def test_unknown_keys_and_bad_values_are_reported_together(tmp_path):
    message = settings_error(tmp_path, "kep: 6\nstrategy: magic\nsamples: 0\nmode: sideways\n")
    for fragment in (
        "kep: unknown setting",
        "strategy: 'magic'",
        "samples: Input should be greater",
        "mode: 'sideways'",
    ):
        assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ('plan_only: "no"\n', "plan_only: Input should be a valid boolean (got 'no')"),
        ("overwrite: 1\n", "overwrite: Input should be a valid boolean (got 1)"),
        ("output: 42\n", "output: Input should be a valid string (got 42)"),
        ("keep: '6'\n", "keep: Input should be a valid integer (got '6')"),
        ("seed: 1.5\n", "seed: Input should be a valid integer (got 1.5)"),
        ("calibration:\n  source: a.txt\n", "calibration: give a source (bundled, a file, hf:NAME"),
        ("calibration: [{source: a.txt, wieght: 2}]\n", "must be a source or {source: NAME, weight: NUMBER}"),
        ("device: gpu\n", "device: must be one of auto, cpu, cuda or cuda:N"),
        ("speed_batch: 1,x\n", "speed_batch: must be positive integers, e.g. 1,8"),
        ("speed_batch: [0]\n", "speed_batch.0: Input should be greater than or equal to 1"),
        ("quantile: 1.5\n", "quantile: Input should be less than 1"),
        ("quantile: 0.5\ntarget_skip: 0.2\n", "give one statistic, not both"),
        ("eval_window: 8\neval_stride: 16\n", "eval_stride: 16 is not smaller than eval_window 8"),
        ("eval_window: 8\neval_stride: 8\n", "eval_stride: 8 is not smaller than eval_window 8"),
        ("tasks: 3\n", "tasks: Input should be a valid list (got 3)"),
        ("recover_merge_align: true\n", "recover_merge_align: applies to --recover merge, which this run does not"),
        ("recover: [router]\nrecover_merge_by: router\n", "recover_merge_by: applies to --recover merge"),
    ],
)
def test_settings_are_strictly_typed(tmp_path, yaml_text, fragment):
    assert fragment in settings_error(tmp_path, yaml_text)


def test_comma_separated_flags_become_lists():
    s = resolve_settings(None, {"tasks": "a,b", "speed_batch": "1,8"})
    assert (s.tasks, s.speed_batch) == (["a", "b"], [1, 8])


def test_choices_name_what_the_algorithms_implement():
    from moe_sparsify import choices, models, search

    assert set(choices.STRATEGIES) == set(search.STRATEGIES)
    assert set(choices.DTYPES) == set(models.DTYPES)


def test_unreadable_config_names_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--config"):
        resolve_settings(tmp_path / "nope.yaml", {})


def test_every_model_alias_resolves():
    from moe_sparsify.aliases import model_aliases

    for name, entry in model_aliases().items():
        assert entry.get("path"), name
        assert resolve_settings(None, {"model": name}).model == name


def test_directories_are_checked_with_the_settings(tmp_path):
    dirs = f"offload_dir: {tmp_path / 'none'}\ntask_dirs: [{tmp_path}, {tmp_path / 'gone'}]\n"
    message = settings_error(tmp_path, dirs)
    assert f"offload_dir: {tmp_path / 'none'} is not a directory" in message
    assert f"task_dirs.1: {tmp_path / 'gone'} is not a directory" in message
    assert resolve_settings(None, {"task_dirs": [str(tmp_path)]}).task_dirs == [str(tmp_path)]
