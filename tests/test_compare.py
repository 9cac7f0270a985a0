"""eval --compare's timing rounds: settled measurements stop early, noisy ones say so (fake timers, no load)."""

import math
import statistics
from pathlib import Path

import pytest
import torch

from moe_sparsify.compare import Rounds, Variant, measure_speed, median_interval

PROMPT = torch.zeros(1, 8, dtype=torch.long)
NEW_TOKENS = 5


class ScriptedTimer:
    """Seconds per call from `seconds(round, variant, step)`, step 0 prefill, 1 one token, 2 all tokens; in the
    order measure_speed times them. Nothing is run."""

    def __init__(self, variants: int, seconds):
        self.variants, self.seconds, self.calls = variants, seconds, 0

    def __call__(self, fn, device) -> float:
        c = self.calls
        self.calls += 1
        return self.seconds(c // (3 * self.variants), (c // 3) % self.variants, c % 3)


def _variants(n: int = 2) -> list[Variant]:
    return [Variant(f"v{i}", None, None) for i in range(n)]


def _measure(seconds, rounds: Rounds, n: int = 2):
    return measure_speed(_variants(n), PROMPT, NEW_TOKENS, rounds, torch.device("cpu"), timer=ScriptedTimer(n, seconds))


def steady(round_, variant, step):
    """The second variant is exactly 1.25x as fast, every round."""
    return (0.1, 0.1, 0.5)[step] / (1.25 if variant else 1.0)


def test_a_quiet_machine_stops_at_the_minimum_and_reports_no_noise():
    measured, noise = _measure(steady, Rounds(minimum=3, budget_s=100))
    assert noise["rounds"] == 3 and not noise["noisy"] and noise["warnings"] == []
    assert measured["v1"]["prefill_speedup"] == pytest.approx(1.25)
    assert measured["v1"]["decode_speedup"] == pytest.approx(1.25)
    assert measured["v1"]["prefill_speedup_interval"] == pytest.approx([1.25, 1.25])
    assert measured["v0"]["prefill_tokens_per_s"] == pytest.approx(8 / 0.1)
    assert measured["v0"]["decode_tokens_per_s"] == pytest.approx((NEW_TOKENS - 1) / 0.4)


def test_rounds_that_disagree_are_flagged_and_timing_goes_on_until_the_budget():
    """The issue's case: one round in three the baseline is slowed 20x, so keep-6 looks 25x faster."""

    def loaded(round_, variant, step):
        slow = 20.0 if variant == 0 and round_ % 3 == 1 else 1.0
        return steady(round_, variant, step) * slow

    measured, noise = _measure(loaded, Rounds(minimum=3, budget_s=20))
    assert noise["noisy"] and noise["rounds"] > 3
    assert noise["timed_s"] >= 20
    assert any("v1 prefill speed-up" in w and "uncertain" in w for w in noise["warnings"])
    low, high = measured["v1"]["prefill_speedup_interval"]
    assert low <= measured["v1"]["prefill_speedup"] <= high and high > 10 * low


def test_a_settling_measurement_takes_more_rounds_then_stops():
    """Noise in the first rounds only: more rounds narrow the median's interval below 10 %, then it stops."""

    def early_noise(round_, variant, step):
        jitter = 1.5 if variant == 1 and round_ in (1, 2) else 1.0
        return steady(round_, variant, step) * jitter

    measured, noise = _measure(early_noise, Rounds(minimum=3, budget_s=1000))
    assert 3 < noise["rounds"] < 50 and not noise["noisy"]
    assert measured["v1"]["prefill_speedup"] == pytest.approx(1.25)


def test_a_drifting_baseline_is_flagged():
    def busier(round_, variant, step):
        return steady(round_, variant, step) * (1.0 if round_ <= 3 else 1.5)

    _, noise = _measure(busier, Rounds(minimum=6, budget_s=1000))
    assert noise["noisy"] and noise["baseline_drift"]["prefill"] == pytest.approx(1 / 3)  # tokens/s fell to 1/1.5
    assert any("drifted" in w for w in noise["warnings"])


def test_a_single_round_is_never_called_settled():
    _, noise = _measure(steady, Rounds(minimum=1, budget_s=0))
    assert noise["rounds"] == 1 and noise["noisy"]
    assert any("single round" in w for w in noise["warnings"])


@pytest.mark.parametrize("n", [1, 2, 5, 6, 10, 30])
def test_median_interval_matches_the_binomial_order_statistics(n):
    values = list(range(1, n + 1))
    low, high, coverage = median_interval(values)
    assert low <= statistics.median(values) <= high
    # Brute force: the widest symmetric pair of order statistics whose coverage is still >= 95 %, else the range.
    best = (values[0], values[-1], 1 - 2 / 2**n)
    for j in range(1, n // 2 + 1):
        cover = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
        if cover >= 0.95:
            best = (values[j - 1], values[n - j], cover)
    assert (low, high) == best[:2] and coverage == pytest.approx(best[2])


def _tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def test_variants_whose_tokenizers_map_ids_differently_are_refused_even_at_one_vocabulary_size(tmp_path):
    import json
    import shutil
    from importlib import resources

    from moe_sparsify.compare import check_one_tokenizer
    from moe_sparsify.errors import UsageError

    tiny = Path(str(resources.files("moe_sparsify") / "assets" / "tiny"))
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny, swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]  # two ordinary tokens trade ids: the size stays, the ids mean other text
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    original, other = _tokenizer(tiny), _tokenizer(swapped)
    assert len(original) == len(other)
    check_one_tokenizer([original, _tokenizer(tiny)])  # the same tokenizer twice passes
    with pytest.raises(UsageError, match="different tokenizers"):
        check_one_tokenizer([original, other])
