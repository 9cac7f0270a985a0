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
    with pytest.raises(UsageError, match="plan .*missing.yaml not found"):
        load_plan(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="plan .* is not a regular file"):  # there, but not a readable file
        load_plan(tmp_path)


def _broken(tmp_path, change) -> str:
    """The message of loading `_plan()` after `change(data)` edits its dictionary."""
    data = _plan().to_dict()
    change(data)
    path = tmp_path / "plan.json"
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(UsageError) as err:
        load_plan(path)
    return str(err.value)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda d: d["layers"].pop(), "MoE layer 1 is missing"),
        (lambda d: d["layers"][1].update(layer=0), "layer 0 appears 2 times; MoE layer 1 is missing"),
        (lambda d: d["layers"][1].update(layer=5), "layer 5 is not one of the MoE layers [0, 1]"),
        (lambda d: d.update(layers=[]), "it lists no layers"),
        (lambda d: d["layers"][0].update(kept=["0"]), "layers.0.kept.0: Input should be a valid integer (got '0')"),
        (lambda d: d["layers"][0].update(kept=[0, 0, 1]), "layer 0 keeps invalid experts [0, 0, 1]"),
        (lambda d: d["layers"][0].update(kept=[0, 8]), "layer 0 keeps invalid experts [0, 8] (ids 0..7)"),
        (lambda d: d["layers"][0].update(kept=[3]), "layer 0 keeps 1 experts, fewer than top_k=2"),
        (lambda d: d.update(seed="3"), "seed: Input should be a valid integer (got '3')"),
        (lambda d: d.update(extra=1), "extra: Unexpected keyword argument"),
        (lambda d: d["model"].pop("top_k"), "model.top_k: Field required"),
    ],
)
def test_malformed_plans_are_refused_on_load(tmp_path, change, fragment):
    message = _broken(tmp_path, change)
    assert fragment in message and message.startswith("malformed plan: ")


def test_every_plan_error_is_listed_at_once(tmp_path):
    message = _broken(tmp_path, lambda d: d.update(seed="x", strategy=4))
    assert "seed:" in message and "strategy:" in message
