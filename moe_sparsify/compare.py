"""Several variants of a model, measured the same way in one run: quality, speed, memory.

A variant is a model (alias or directory), optionally with skipping:
    tiny                      the original
    tiny-keep6                an exported checkpoint
    tiny-keep6+skip           ... with the threshold file exported beside it
    tiny-keep6+t.json         ... with a given threshold file
Speed is measured interleaved (every round times each variant in turn, so
drifts in machine load hit all of them alike), warm-up excluded; rounds go on
until every speed-up's median is known within 10 % or a time budget is spent,
and a measurement that did not settle says so (`noise`: warnings, a flag).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapters import MoEAdapter, adapter_for
from .errors import UsageError
from .evaluate import perplexity
from .export import PLAN_FILE, THRESHOLDS_FILE
from .models import load_model, resolve_model_dir
from .plan import Plan, load_plan
from .skipping import skip_fractions, skipping
from .thresholds import SkipThresholds, load_thresholds
from .timing import timed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Variant:
    spec: str
    model_dir: Path
    thresholds_path: Path | None
    model: object = None
    adapter: MoEAdapter | None = None
    thresholds: SkipThresholds | None = None
    plan: Plan | None = None
    results: dict = field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
    model, plus, skip = spec.partition("+")
    if plus and not skip:  # `tiny+` would silently compare the plain model
        raise UsageError(f"variant {spec!r} names nothing after '+'; write MODEL+skip or MODEL+THRESHOLDS_FILE")
    model_dir = resolve_model_dir(model)
    thresholds = None
    if skip:
        thresholds = model_dir / THRESHOLDS_FILE if skip == "skip" else Path(skip)
        if not thresholds.is_file():
            raise UsageError(
                f"variant {spec!r}: no threshold file {thresholds}; run skip-profile or export --thresholds"
            )
    return Variant(spec, model_dir, thresholds)


def load_variant(variant: Variant, dtype: torch.dtype, device: torch.device) -> PreTrainedTokenizerBase:
    """Load the variant's model (onto `device`), plan and thresholds into it; returns its tokenizer."""
    variant.model, tokenizer = load_model(variant.model_dir, dtype)
    variant.model.to(device)
    variant.adapter = adapter_for(variant.model.config)
    if (variant.model_dir / PLAN_FILE).is_file():
        variant.plan = load_plan(variant.model_dir / PLAN_FILE)
    if variant.thresholds_path:
        variant.thresholds = load_thresholds(variant.thresholds_path)
    return tokenizer


def check_one_tokenizer(tokenizers: list[PreTrainedTokenizerBase]) -> None:
    """Every variant is scored on the ids the first variant's tokenizer gives the text, so all must map
    tokens to ids alike: an equal vocabulary size is not enough (the same ids would be other tokens)."""
    first = tokenizers[0].get_vocab()
    if any(t.get_vocab() != first for t in tokenizers[1:]):
        raise UsageError("the variants use different tokenizers; compare variants of one model")


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed_s(fn, device) -> float:
    return timed(fn, device)[0]


@dataclass(frozen=True)
class Rounds:
    """How many timed rounds: at least `minimum`; then more while any speed-up's interval is wider than
    `tolerance` of its median, until `budget_s` seconds of timed work are spent (or `maximum` rounds)."""

    minimum: int  # the settings' repeats
    budget_s: float  # the settings' speed_budget_s
    tolerance: float = 0.10
    maximum: int = 1000


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): a distribution-free confidence interval for the median, between two order
    statistics chosen from the binomial(n, 1/2) law. Below 6 values no pair reaches 95 %; then it is the
    range, with the coverage it has (5 values: 94 %; 3 values: 75 %)."""
    ordered = sorted(values)
    n = len(ordered)
    tail, j = 0.0, 0  # j: values dropped at each end; tail: P(binomial < j)
    while j < n // 2:
        next_tail = tail + math.comb(n, j) / 2**n
        if next_tail > (1 - confidence) / 2:
            break
        tail, j = next_tail, j + 1
    if j == 0:
        return ordered[0], ordered[-1], 1 - 2 / 2**n if n else 0.0
    return ordered[j - 1], ordered[n - j], 1 - 2 * tail


def relative_width(values: list[float]) -> float:
    """Width of the median's interval relative to the median; infinite from one value (no spread known)."""
    if len(values) < 2:
        return math.inf
    low, high, _ = median_interval(values)
    return (high - low) / statistics.median(values)


def drift(values: list[float]) -> float:
    """Relative change of the median between the first and the second half of the rounds: a machine
    getting busier or quieter while we measure."""
    if len(values) < 2:
        return 0.0
    half = len(values) // 2
    first, second = statistics.median(values[:half]), statistics.median(values[-half:])
    return abs(second - first) / first


KINDS = ("prefill", "decode")


@torch.no_grad()
def measure_speed(
    variants: list[Variant],
    prompt: torch.Tensor,
    new_tokens: int,
    rounds: Rounds,
    device: torch.device,
    progress=None,
    timer=timed_s,
) -> tuple[dict[str, dict], dict]:
    """Per variant: prefill tokens/s (one forward over the prompt batch) and decode tokens/s (greedy
    generation of `new_tokens` minus generation of 1, per generated token of the batch), each a median
    over rounds with its interval, and speed-ups against the first variant. Also how settled the
    measurement is (`noise`). `timer(fn, device)` returns seconds; tests pass a fake one."""
    prompt = prompt.to(device)
    batch = prompt.shape[0]
    rates = {v.spec: {kind: [] for kind in KINDS} for v in variants}
    task = progress.add_task("speed", total=None) if progress else None
    peak = dict.fromkeys((v.spec for v in variants), 0)
    timed_work = 0.0
    round_ = 0
    while True:
        for v in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with skipping(v.model, v.thresholds, v.adapter):
                prefill = timer(lambda v=v: v.model(input_ids=prompt, use_cache=False), device)
                one = timer(lambda v=v: v.model.generate(prompt, max_new_tokens=1, do_sample=False), device)
                full = timer(
                    lambda v=v: v.model.generate(
                        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                    ),
                    device,
                )
            if device.type == "cuda":
                peak[v.spec] = max(peak[v.spec], torch.cuda.max_memory_allocated(device))
            if round_:  # round 0 warms up
                timed_work += prefill + one + full
                rates[v.spec]["prefill"].append(batch * prompt.shape[1] / prefill)
                rates[v.spec]["decode"].append(batch * (new_tokens - 1) / max(full - one, 1e-9))
            if progress:
                progress.advance(task)
        if round_ >= rounds.minimum:
            settled = _unsettled(rates, variants, rounds.tolerance) == []
            if settled or timed_work >= rounds.budget_s or round_ >= rounds.maximum:
                break
        round_ += 1
    return _summarise(rates, variants, peak, device, rounds, timed_work)


def _speedups(rates: dict, variants: list[Variant], kind: str, spec: str) -> list[float]:
    # Speed-ups are taken round by round against the baseline timed in the same round: machine speed
    # drifts between runs (tens of percent on shared machines), their ratio much less.
    return [a / b for a, b in zip(rates[spec][kind], rates[variants[0].spec][kind])]


def _unsettled(rates: dict, variants: list[Variant], tolerance: float) -> list[tuple[str, str, float]]:
    """(variant, kind, relative width) of every speed-up whose interval is wider than `tolerance`."""
    wide = []
    for v in variants[1:]:
        for kind in KINDS:
            width = relative_width(_speedups(rates, variants, kind, v.spec))
            if width > tolerance:
                wide.append((v.spec, kind, width))
    return wide


def _uncertain(spec: str, kind: str, out: dict, width: float, rounds: int) -> str:
    median, (low, high) = out[f"{kind}_speedup"], out[f"{kind}_speedup_interval"]
    if math.isinf(width):
        return f"{spec} {kind} speed-up {median:.2f}x rests on a single round"
    return f"{spec} {kind} speed-up {median:.2f}x is uncertain: interval {low:.2f}-{high:.2f} after {rounds} rounds"


def _summarise(rates, variants, peak, device, rounds: Rounds, timed_work: float) -> tuple[dict, dict]:
    measured: dict[str, dict] = {}
    for v in variants:
        out = measured[v.spec] = {}
        if device.type == "cuda":  # on CPUs the process RSS mixes all variants: see weights_bytes instead
            out["cuda_peak_allocated_bytes"] = peak[v.spec]
        for kind in KINDS:
            values, ratios = rates[v.spec][kind], _speedups(rates, variants, kind, v.spec)
            low, high, coverage = median_interval(ratios)
            out[f"{kind}_tokens_per_s"] = statistics.median(values)
            out[f"{kind}_spread"] = [min(values), max(values)]
            out[f"{kind}_speedup"] = statistics.median(ratios)
            out[f"{kind}_speedup_interval"] = [low, high]
            out[f"{kind}_speedup_spread"] = [min(ratios), max(ratios)]
    wide = _unsettled(rates, variants, rounds.tolerance)
    baseline = rates[variants[0].spec]
    drifts = {kind: drift(baseline[kind]) for kind in KINDS}
    n = len(baseline["prefill"])
    warnings = [_uncertain(spec, kind, measured[spec], width, n) for spec, kind, width in wide]
    warnings += [
        f"the baseline's {kind} speed drifted {100 * d:.0f} % between the first and second half of the rounds"
        for kind, d in drifts.items()
        if d > rounds.tolerance
    ]
    noise = {
        "rounds": n,
        "timed_s": timed_work,
        "budget_s": rounds.budget_s,
        "tolerance": rounds.tolerance,
        "interval_coverage": median_interval(baseline["prefill"])[2],
        "baseline_drift": drifts,
        "noisy": bool(warnings),
        "warnings": warnings,
    }
    return measured, noise


def measure_quality(
    variants: list[Variant], stream: torch.Tensor, window: int, stride: int, device, progress=None, harness=None
):
    """Perplexity of each variant and, with `harness(model)`, its lm-eval task scores."""
    task = progress.add_task("quality", total=len(variants)) if progress else None
    for v in variants:
        with skipping(v.model, v.thresholds, v.adapter):
            v.results.update(perplexity(v.model, stream, window, stride, device))
            if harness is not None:
                v.results["harness"] = harness(v.model)
            if v.thresholds is not None:
                v.results["skip_fraction"] = skip_fractions(v.model, v.adapter)
        if progress:
            progress.advance(task)


def describe(v: Variant) -> dict:
    adapter = v.adapter
    layers = adapter.moe_layers(v.model)
    return {
        "variant": v.spec,
        "model_dir": str(v.model_dir),
        "experts": adapter.num_experts,
        "moe_layers": len(layers),
        "parameters": sum(p.numel() for p in v.model.parameters()),
        "weights_bytes": weights_bytes(v.model),
        "kept_experts": v.plan.kept() if v.plan else None,
        "original_experts": v.plan.model.num_experts if v.plan else adapter.num_experts,
        "thresholds": str(v.thresholds_path) if v.thresholds_path else None,
    }
