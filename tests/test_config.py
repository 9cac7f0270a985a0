"""Settings precedence and validation: every problem reported at once."""

import pytest

from moe_sparsify.config import resolve_settings
from moe_sparsify.errors import UsageError


def test_flags_override_yaml_which_overrides_alias_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\nkeep: 4\nsamples: 16\nstrategy: greedy\n")
    s = resolve_settings(cfg, {"keep": 6, "seed": None})
    assert (s.keep, s.samples, s.strategy, s.seq_len) == (6, 16, "greedy", 256)  # seq_len from the tiny alias


def test_unknown_keys_and_bad_values_are_reported_together(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("kep: 6\nstrategy: magic\nsamples: 0\nmode: sideways\n")
    with pytest.raises(UsageError) as err:
        resolve_settings(cfg, {})
    message = str(err.value)
    for fragment in ("kep: unknown setting", "strategy: 'magic'", "samples: must be a positive", "mode: 'sideways'"):
        assert fragment in message


def test_unreadable_config_names_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--config"):
        resolve_settings(tmp_path / "nope.yaml", {})


def test_every_model_alias_resolves():
    from moe_sparsify.models import model_aliases

    for name, entry in model_aliases().items():
        assert entry.get("path"), name
        assert resolve_settings(None, {"model": name}).model == name
