"""Plan files round-trip through YAML and JSON and refuse other models."""

import pytest

from moe_sparsify.errors import UsageError
from moe_sparsify.plan import LayerPlan, ModelIdentity, Plan, load_plan

IDENTITY = ModelIdentity("mixtral", 2, 8, 2, [0, 1], "ab" * 32)


def _plan() -> Plan:
    return Plan(
        source="tiny",
        model=IDENTITY,
        strategy="greedy",
        mode="progressive",
        seed=3,
        calibration={"samples": 4, "sources": [{"source": "bundled", "weight": 1.0}]},
        versions={"torch": "2.13.0"},
        layers=[LayerPlan(0, [0, 1, 2, 5], 0.125, None, 1), LayerPlan(1, [1, 2, 3, 7], 1 / 3, 0.5, 26)],
        options={"keep": 4},
    )


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    plan = _plan()
    loaded = load_plan(plan.save(tmp_path / f"plan{suffix}"))
    assert loaded == plan
    assert loaded.dumps("json") == plan.dumps("json")
    assert loaded.sha256() == plan.sha256()


def test_mismatched_model_is_refused():
    other = ModelIdentity("mixtral", 2, 6, 2, [0, 1], "cd" * 32)
    with pytest.raises(UsageError, match="num_experts 8 in the plan, 6 in the model"):
        _plan().check_matches(other)


def test_foreign_and_broken_files_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: something-else\n")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a moe-sparsify plan"):
        load_plan(tmp_path / "a.yaml")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_plan(tmp_path / "b.json")
    with pytest.raises(UsageError, match="cannot read plan"):
        load_plan(tmp_path / "missing.yaml")
