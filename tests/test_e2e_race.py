"""Racing the e2e shortlist (`e2e_race_z`): against a brute-force reference, against plain e2e, and its cost."""

import math
import statistics

import pytest
import torch

import moe_sparsify.search as search_module
from moe_sparsify.adapters import adapter_for
from moe_sparsify.config import Settings
from moe_sparsify.cost import SearchCost
from moe_sparsify.divergence import DIVERGENCES, mean_divergence, sequence_divergences
from moe_sparsify.prune import plan_pruning
from moe_sparsify.search import race

from .conftest import random_mixtral, settings_error

CPU = torch.device("cpu")
LAYERS, KEEP, SEQUENCES, SEQ_LEN, BATCH = 3, 6, 8, 16, 2


class TableScorer:
    """A round scorer reading a fixed table (subsets x sequences), `width` sequences a round, looking at
    the race every `look` of them (default: once a round, as one process does)."""

    def __init__(self, table: torch.Tensor, width: int, look: int | None = None):
        self.table, self.width, self.look = table, width, look or width
        self.rounds = math.ceil(table.shape[1] / width)
        self.calls: list[tuple[list, int]] = []

    def __call__(self, subsets, round):
        self.calls.append((subsets, round))
        return self.table[[s[0] for s in subsets], round * self.width : (round + 1) * self.width]


def reference_race(table: list[list[float]], width: int, z: float) -> tuple[int, int]:
    """The racing rule written out one candidate at a time with the statistics module: (winner, pairs scored)."""
    alive, seen, pairs = list(range(len(table))), 0, 0
    rounds = math.ceil(len(table[0]) / width)
    for round in range(rounds):
        pairs += len(alive) * len(table[0][round * width : (round + 1) * width])
        seen = min(len(table[0]), seen + width)
        mean = {c: statistics.fmean(table[c][:seen]) for c in alive}
        leader = min(alive, key=lambda c: (mean[c], c))
        if round == rounds - 1:
            return leader, pairs
        if seen > 1:
            survivors = [leader]
            for c in alive:
                if c != leader:
                    diffs = [a - b for a, b in zip(table[c][:seen], table[leader][:seen])]
                    if not statistics.fmean(diffs) > z * statistics.stdev(diffs) / math.sqrt(seen):
                        survivors.append(c)
            alive = sorted(survivors)
        if len(alive) == 1:
            return leader, pairs


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("z", [0.5, 2.0, 4.0])
def test_race_equals_the_rule_written_out(seed, z):
    gen = torch.Generator().manual_seed(seed)
    # Candidates with different means and noisy, correlated per-sequence values (as KL on shared sequences).
    table = (torch.rand(6, 1, generator=gen) + 0.5 * torch.rand(1, 24, generator=gen)) + 0.1 * torch.randn(
        6, 24, generator=gen
    )
    scorer = TableScorer(table.double(), width=4)
    outcome = race([(i,) for i in range(6)], scorer, z)
    winner, pairs = reference_race(table.double().tolist(), 4, z)
    assert outcome.order[0] == winner and outcome.evaluations == pairs
    assert outcome.divergence == pytest.approx(table[winner, : 4 * len({r for _, r in scorer.calls})].mean().item())


@pytest.mark.parametrize("seed", range(6))
def test_rounds_of_several_looks_race_as_one_look_a_round(seed):
    """Under torchrun a round holds one batch per rank, in calibration order: looking every batch inside it
    drops the same subsets at the same sequences as one process scoring a batch a round."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(6, 1, generator=gen) + 0.2 * torch.randn(6, 30, generator=gen, dtype=torch.float64)
    one = race([(i,) for i in range(6)], TableScorer(table, 3), 1.0)
    shared = race([(i,) for i in range(6)], TableScorer(table, 6, look=3), 1.0)
    assert shared.order == one.order and shared.divergence == one.divergence
    assert shared.evaluations >= one.evaluations  # a subset dropped mid-round was scored to the round's end


def test_race_drops_a_clearly_worse_subset_and_stops_scoring_it():
    table = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.05, 0.95], [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]])
    scorer = TableScorer(table, width=2)
    outcome = race([(0,), (1,)], scorer, 2.0)
    assert outcome.order == [0] and outcome.evaluations == 4  # both on round 0, then the winner is alone
    assert [round for _, round in scorer.calls] == [0]


def test_a_huge_margin_never_drops_and_ranks_as_full_scoring():
    """Without drops racing is plain scoring; a small margin on noisy, near-tied subsets can pick
    another subset (the reference check above is not vacuous)."""
    gen = torch.Generator().manual_seed(3)
    table = 1.0 + 0.3 * torch.randn(8, 32, generator=gen, dtype=torch.float64)
    full = race([(i,) for i in range(8)], TableScorer(table, 4), 1e9)
    assert full.order[0] == int(table.mean(1).argmin()) and full.evaluations == table.numel()
    assert full.order == sorted(range(8), key=lambda i: table[i].mean().item())
    picks = {race([(i,) for i in range(8)], TableScorer(table, 4), z).order[0] for z in (0.1, 0.3, 0.5, 1.0)}
    assert picks != {full.order[0]}


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sequence_divergences_average_to_the_mean_divergence(kind):
    gen = torch.Generator().manual_seed(0)
    p, q = (torch.log_softmax(torch.randn(3, 5, 11, generator=gen), -1) for _ in range(2))
    per = sequence_divergences(p, q, kind)
    assert per.shape == (3,)
    assert per.mean().item() == pytest.approx(mean_divergence([p], [q], kind), rel=1e-6)
    assert per[1].item() == pytest.approx(mean_divergence([p[1:2]], [q[1:2]], kind), rel=1e-6)


def _tokens():
    return torch.randint(0, 2048, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(9))


def _plan(model, cost=None, **overrides):
    settings = Settings(model="test", keep=KEEP, strategy="e2e", e2e_samples=SEQUENCES, batch_size=BATCH, **overrides)
    return plan_pruning(model, adapter_for(model.config), settings, _tokens(), {}, device=CPU, cost=cost)[0]


@pytest.mark.parametrize("horizon", [None, 0])
def test_racing_without_drops_gives_the_plain_e2e_plan(horizon):
    """Every shortlisted subset scored on every sequence, a batch at a time: the same kept sets and
    divergences as e2e scoring all sequences at once."""
    model = random_mixtral(layers=LAYERS)
    plain = _plan(model, e2e_shortlist=28, e2e_horizon=horizon)
    raced = _plan(model, e2e_shortlist=28, e2e_horizon=horizon, e2e_race_z=1e9)
    assert raced.kept() == plain.kept()
    for got, want in zip(raced.layers, plain.layers):
        assert got.divergence == pytest.approx(want.divergence, rel=1e-5)
    assert raced.options["e2e_race_z"] == 1e9 and "e2e_race_z" not in plain.options


def test_cost_counter_counts_the_raced_sequences(monkeypatch):
    """Layer and head forwards x tokens, counted by hooks, equal the closed form: progressive propagation,
    the reference pass, and per layer the (subset, sequence) pairs the race scored through the layers
    up to the logits; a race that drops subsets costs less than plain e2e."""
    evaluations = []

    def counting_race(*args):
        outcome = race(*args)
        evaluations.append(outcome.evaluations)
        return outcome

    monkeypatch.setattr(search_module, "race", counting_race)
    model = random_mixtral(layers=LAYERS)
    raced, plain = SearchCost(), SearchCost()
    _plan(model, raced, e2e_shortlist=28, e2e_race_z=0.5)
    _plan(model, plain, e2e_shortlist=28)
    assert len(evaluations) == LAYERS
    rescored = sum(pairs * (LAYERS - layer) for layer, pairs in enumerate(evaluations))
    assert raced.layer_tokens == (3 * LAYERS * SEQUENCES + rescored) * SEQ_LEN
    assert raced.head_tokens == (SEQUENCES + sum(evaluations)) * SEQ_LEN
    assert raced.layer_tokens < plain.layer_tokens and raced.head_tokens < plain.head_tokens


@pytest.mark.parametrize("value", ["0", "-1", "two", ".nan", ".inf", "true"])
def test_bad_race_margin_is_refused_in_one_line(tmp_path, value):
    message = settings_error(tmp_path, f"e2e_race_z: {value}\n")
    assert "e2e_race_z:" in message and "\n" not in message


def test_sequences_gathered_from_ranks_come_in_calibration_order(monkeypatch):
    """Two ranks in two threads, summing through a shared inbox: rank r holds sequences r, r + 2, ...
    (`shard`), and the gathered columns are every sequence in calibration order, on both ranks."""
    import threading

    from moe_sparsify import distributed

    barrier, inbox, local = threading.Barrier(2), {}, threading.local()

    def all_sum(tensor):
        inbox[local.rank] = tensor.clone()
        barrier.wait()
        total = inbox[0] + inbox[1]
        barrier.wait()
        return total

    monkeypatch.setattr(distributed, "world", lambda: (local.rank, 2))
    monkeypatch.setattr(distributed, "all_sum", all_sum)
    sequences = torch.arange(7, dtype=torch.float64)  # rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5 (one fewer)
    values = torch.stack([sequences, 10 - sequences])  # two subsets
    gathered = {}

    def rank(r):
        local.rank = r
        gathered[r] = distributed.gather_sequences(values[:, r::2])

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert torch.equal(gathered[0], values) and torch.equal(gathered[1], values)
