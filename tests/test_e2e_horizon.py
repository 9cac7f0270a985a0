"""The e2e divergence read a few layers ahead (`e2e_horizon`), against brute force, and what it costs."""

import pytest
import torch

from moe_sparsify.adapters import adapter_for
from moe_sparsify.config import Settings
from moe_sparsify.cost import SearchCost, e2e_search_cost, exhaustive_search_cost
from moe_sparsify.prune import model_identity, plan_pruning, search_fingerprint
from moe_sparsify.streaming import StreamedModel

from .conftest import assert_brute_force_e2e, random_mixtral, save_with_tokenizer, settings_error

CPU = torch.device("cpu")
LAYERS, KEEP, SEQUENCES, SEQ_LEN = 3, 6, 4, 16


def _tokens():
    return torch.randint(0, 2048, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(9))


def _plan(model, cost=None, **overrides):
    settings = Settings(model="test", keep=KEEP, strategy="e2e", e2e_samples=SEQUENCES, batch_size=2, **overrides)
    return plan_pruning(model, adapter_for(model.config), settings, _tokens(), {}, device=CPU, cost=cost)[0]


def _lens_log_probs(model, adapter, tokens, depth):
    """Full forward of the model; the final norm and head applied to decoder layer depth-1's output."""
    caught = {}
    layer = adapter.decoder_layers(model)[depth - 1]
    handle = layer.register_forward_hook(lambda m, a, out: caught.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        model(input_ids=tokens)
    finally:
        handle.remove()
    return torch.log_softmax(adapter.final_logits(model, caught["h"]).float(), -1)


def test_horizon_reaching_the_logits_gives_todays_e2e_plan():
    model = random_mixtral(layers=LAYERS)
    today = _plan(model, e2e_shortlist=28)
    reaching = _plan(model, e2e_shortlist=28, e2e_horizon=LAYERS - 1)
    assert reaching.layers == today.layers
    assert reaching.options["e2e_horizon"] == LAYERS - 1 and "e2e_horizon" not in today.options


@pytest.mark.parametrize("horizon", [0, 1])
def test_horizon_equals_brute_force_logit_lens_search(horizon):
    """Every subset shortlisted: each layer keeps the subset whose pruned model, read at depth
    layer + 1 + horizon through the final norm and head, diverges least from the original read there."""
    model = random_mixtral(layers=LAYERS)
    adapter = adapter_for(model.config)
    tokens = _tokens()
    plan = _plan(model, e2e_shortlist=28, e2e_horizon=horizon)
    assert_brute_force_e2e(
        plan,
        model,
        adapter,
        KEEP,
        lambda layer: _lens_log_probs(model, adapter, tokens, min(LAYERS, layer + 1 + horizon)),
    )


def test_a_short_horizon_reads_the_divergence_earlier():
    """The brute-force test above is not vacuous: horizon 0 reads layer 0's divergence at depth 1, not at
    the logits (a different number), while the last layer is read at the logits either way."""
    model = random_mixtral(layers=LAYERS)
    logits, lens = _plan(model, e2e_shortlist=28), _plan(model, e2e_shortlist=28, e2e_horizon=0)
    assert lens.layers[0].divergence != pytest.approx(logits.layers[0].divergence, rel=1e-3)
    if lens.kept() == logits.kept():
        assert lens.layers[-1].divergence == pytest.approx(logits.layers[-1].divergence, rel=1e-5)


@pytest.mark.parametrize("race_z", [None, 1.0])
def test_logits_layers_covering_every_layer_give_todays_e2e_plan(race_z):
    model = random_mixtral(layers=LAYERS)
    today = _plan(model, e2e_shortlist=28, e2e_race_z=race_z)
    covering = _plan(model, e2e_shortlist=28, e2e_race_z=race_z, e2e_horizon=0, e2e_logits_layers=LAYERS)
    assert covering.layers == today.layers
    assert covering.options["e2e_logits_layers"] == LAYERS and "e2e_logits_layers" not in today.options


def test_no_logits_layers_give_the_horizon_plan():
    model = random_mixtral(layers=LAYERS)
    assert _plan(model, e2e_horizon=0, e2e_logits_layers=0).layers == _plan(model, e2e_horizon=0).layers


def test_logits_layers_equal_brute_force_search():
    """Layer 0 read at the logits, layers 1 and 2 through the logit lens at horizon 0 (depths 3, 2, 3: the
    original states at depth 2 must outlive layer 0's search), against full forwards of the pruned model;
    and the check fails when fed the plain horizon-0 reading, so it can tell them apart."""
    model = random_mixtral(layers=LAYERS)
    adapter = adapter_for(model.config)
    tokens = _tokens()
    plan = _plan(model, e2e_shortlist=28, e2e_horizon=0, e2e_logits_layers=1)

    def read_at(stops):
        return lambda layer: _lens_log_probs(model, adapter, tokens, stops[layer])

    assert_brute_force_e2e(plan, model, adapter, KEEP, read_at([LAYERS, 2, 3]))
    with pytest.raises(AssertionError):
        assert_brute_force_e2e(plan, model, adapter, KEEP, read_at([1, 2, 3]))


def _stops(horizon, logits_layers=0):
    """The depth each layer's divergence is read at, written out: the logits for the first
    `logits_layers` layers and without a horizon, else horizon + 1 layers on, at most the logits."""
    return [LAYERS if horizon is None or i < logits_layers else min(LAYERS, i + 1 + horizon) for i in range(LAYERS)]


@pytest.mark.parametrize(("horizon", "logits_layers"), [(None, 0), (0, 0), (1, 0), (0, 1), (0, 2)])
def test_cost_counter_equals_the_closed_form(horizon, logits_layers):
    """Decoder-layer and head forwards x tokens, counted by hooks on the modules, equal the closed form
    (`cost.e2e_search_cost`): progressive propagation (every layer once, then again pruned), the reference
    pass from the first MoE layer, and per layer `shortlist` subsets through the layers up to the depth
    it is read at and the head."""
    model = random_mixtral(layers=LAYERS)
    tokens, shortlist = SEQUENCES * SEQ_LEN, 5
    cost = SearchCost()
    _plan(model, cost, e2e_shortlist=shortlist, e2e_horizon=horizon, e2e_logits_layers=logits_layers)
    stops = _stops(horizon, logits_layers)
    # Keep 6 of 8 with top-2: each token's candidates are its top 4 experts.
    assert cost == e2e_search_cost(LAYERS, tokens, tokens, 4, stops, [shortlist * tokens] * LAYERS)
    assert cost.layer_tokens == (2 * LAYERS + LAYERS + shortlist * sum(s - i for i, s in enumerate(stops))) * tokens
    # The head reads the reference again where the depth read changes: (3, 2, 3) reads it three times.
    reads = {(None, 0): 1, (0, 0): 3, (1, 0): 2, (0, 1): 3, (0, 2): 1}[horizon, logits_layers]
    assert cost.head_tokens == (reads + shortlist * LAYERS) * tokens


def test_closed_form_counts_what_an_exhaustive_search_counts():
    model = random_mixtral(layers=LAYERS)
    cost = SearchCost()
    settings = Settings(model="test", keep=KEEP, strategy="exhaustive", batch_size=2)
    plan_pruning(model, adapter_for(model.config), settings, _tokens(), {}, device=CPU, cost=cost)
    assert cost == exhaustive_search_cost(LAYERS, SEQUENCES * SEQ_LEN, 4)


def test_a_logits_layer_costs_the_layers_to_the_logits():
    """Reading layer 0 at the logits re-runs every later layer for each of its subsets; the others keep
    their horizon."""
    tokens = SEQUENCES * SEQ_LEN
    horizon, logits = (
        e2e_search_cost(LAYERS, tokens, tokens, 4, _stops(0, k), [5 * tokens] * LAYERS).layer_tokens for k in (0, 1)
    )
    assert logits - horizon == 5 * tokens * (LAYERS - 1)


def test_cost_counter_counts_a_streamed_search_as_the_same_search_in_memory(tmp_path):
    """--stream loads each decoder layer into the skeleton's own modules, which carry the counting hooks:
    a streamed e2e search costs exactly what it costs in memory (a counter blind to streamed layers reads 0)."""
    model = random_mixtral(layers=LAYERS)
    adapter = adapter_for(model.config)
    directory = save_with_tokenizer(model, tmp_path / "model")
    settings = Settings(model="test", keep=KEEP, strategy="e2e", e2e_samples=SEQUENCES, batch_size=2, e2e_shortlist=5)
    in_memory = SearchCost()
    plan_pruning(model, adapter, settings, _tokens(), {}, device=CPU, cost=in_memory)
    streamed = StreamedModel(directory, adapter, torch.float32)
    identity = model_identity(streamed.model, adapter, streamed.router_weights())
    counted = SearchCost()
    tokens = _tokens()
    plan_pruning(
        streamed.model, adapter, settings, tokens, {}, device=CPU, cost=counted, residency=streamed, identity=identity
    )
    assert counted == in_memory
    assert counted.layer_tokens > 0 and counted.head_tokens > 0 and counted.expert_tokens > 0


@pytest.mark.parametrize("key", ["e2e_horizon", "e2e_logits_layers"])
@pytest.mark.parametrize("value", ["-1", "two", "1.5", "true"])
def test_bad_horizon_is_refused_in_one_line(tmp_path, key, value):
    message = settings_error(tmp_path, f"{key}: {value}\n")
    assert f"{key}:" in message and "\n" not in message


def test_logits_layers_without_a_horizon_are_refused_in_one_line(tmp_path):
    """Strategy e2e reads every layer at the logits unless given a horizon: the setting would do nothing."""
    message = settings_error(tmp_path, "strategy: e2e\ne2e_logits_layers: 1\n")
    assert "e2e_logits_layers: strategy e2e without e2e_horizon" in message and "\n" not in message
    from moe_sparsify.config import resolve_settings

    for given in ("strategy: e2e\ne2e_horizon: 1\n", "strategy: e2e-fast\n"):
        (tmp_path / "ok.yaml").write_text(f"{given}e2e_logits_layers: 2\n")
        assert resolve_settings(tmp_path / "ok.yaml", {}).e2e_logits_layers == 2


def test_logits_layers_are_in_the_resume_fingerprint():
    """A run interrupted with one setting does not resume with another."""
    model = random_mixtral(layers=2)
    identity = model_identity(model, adapter_for(model.config))

    def fingerprint(**given):
        return search_fingerprint(Settings(model="test", keep=KEEP, strategy="e2e-fast", **given), {}, identity)

    assert fingerprint(e2e_logits_layers=0) != fingerprint(e2e_logits_layers=1)


def test_e2e_fast_is_e2e_with_its_own_defaults_and_takes_overrides():
    model = random_mixtral(layers=LAYERS)  # three layers: horizon 1 reads layer 0 short of the logits
    adapter = adapter_for(model.config)

    def options(**given):
        settings = Settings(model="test", keep=KEEP, batch_size=2, **given)
        plan = plan_pruning(model, adapter, settings, _tokens(), {}, device=CPU)[0]
        return {k: v for k, v in plan.options.items() if k.startswith("e2e")}, plan

    fast, fast_plan = options(strategy="e2e-fast")
    assert fast == {
        "e2e_shortlist": 16,
        "e2e_samples": 64,
        "e2e_horizon": 1,
        "e2e_race_z": 2.0,
        "e2e_logits_layers": 1,
        "e2e_divergence": "kl",
    }
    assert fast_plan.strategy == "e2e-fast" and fast_plan.mode == "progressive"
    today, _ = options(strategy="e2e")
    assert today == {"e2e_shortlist": 16, "e2e_samples": 64, "e2e_divergence": "kl"}  # as before e2e-fast
    given, _ = options(
        strategy="e2e-fast", e2e_shortlist=3, e2e_samples=2, e2e_horizon=0, e2e_race_z=1.0, e2e_logits_layers=2
    )
    assert given == {
        "e2e_shortlist": 3,
        "e2e_samples": 2,
        "e2e_horizon": 0,
        "e2e_race_z": 1.0,
        "e2e_logits_layers": 2,
        "e2e_divergence": "kl",
    }
    explicit = {"e2e_shortlist": 16, "e2e_samples": 64, "e2e_horizon": 1, "e2e_race_z": 2.0}
    assert options(strategy="e2e", **explicit, e2e_logits_layers=1)[1].layers == fast_plan.layers
    # The e2e-fast before e2e_logits_layers existed (README): its settings written out, or logits layers 0.
    before = options(strategy="e2e", **explicit)[1]
    assert options(strategy="e2e-fast", e2e_logits_layers=0)[1].layers == before.layers
