"""Several variants of a model, measured the same way in one run: quality, speed, memory.

A variant is a model (alias or directory), optionally with skipping:
    tiny                      the original
    tiny-keep6                an exported checkpoint
    tiny-keep6+skip           ... with the threshold file exported beside it
    tiny-keep6+t.json         ... with a given threshold file
Speed is measured interleaved (every repeat times each variant in turn, so
drifts in machine load hit all of them alike), warm-up excluded, medians
reported with their spread (min-max over repeats).
"""

from __future__ import annotations

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
    model, _, skip = spec.partition("+")
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


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed_s(fn, device) -> float:
    return timed(fn, device)[0]


@torch.no_grad()
def measure_speed(
    variants: list[Variant], prompt: torch.Tensor, new_tokens: int, repeats: int, device: torch.device, progress=None
) -> dict[str, dict]:
    """Per variant: prefill tokens/s (one forward over the prompt batch) and decode tokens/s (greedy
    generation of `new_tokens` minus generation of 1, per generated token of the batch), with spreads
    and speed-ups against the first variant."""
    prompt = prompt.to(device)
    batch = prompt.shape[0]
    times = {v.spec: {"prefill": [], "one": [], "full": []} for v in variants}
    task = progress.add_task("speed", total=(repeats + 1) * len(variants)) if progress else None
    peak = dict.fromkeys((v.spec for v in variants), 0)
    for round_ in range(repeats + 1):  # round 0 warms up
        for v in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with skipping(v.model, v.thresholds, v.adapter):
                prefill = timed_s(lambda v=v: v.model(input_ids=prompt, use_cache=False), device)
                one = timed_s(lambda v=v: v.model.generate(prompt, max_new_tokens=1, do_sample=False), device)
                full = timed_s(
                    lambda v=v: v.model.generate(
                        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                    ),
                    device,
                )
            if device.type == "cuda":
                peak[v.spec] = max(peak[v.spec], torch.cuda.max_memory_allocated(device))
            if round_:
                for key, value in (("prefill", prefill), ("one", one), ("full", full)):
                    times[v.spec][key].append(value)
            if progress:
                progress.advance(task)
    rates = {}
    for v in variants:
        t = times[v.spec]
        rates[v.spec] = {
            "prefill": [batch * prompt.shape[1] / s for s in t["prefill"]],
            "decode": [batch * (new_tokens - 1) / max(f - o, 1e-9) for f, o in zip(t["full"], t["one"])],
        }
    baseline = rates[variants[0].spec]
    measured: dict[str, dict] = {}
    for v in variants:
        out = measured[v.spec] = {}
        if device.type == "cuda":  # on CPUs the process RSS mixes all variants: see weights_bytes instead
            out["cuda_peak_allocated_bytes"] = peak[v.spec]
        for kind, values in rates[v.spec].items():
            # Speed-ups are taken round by round against the baseline timed in the same round: machine
            # speed drifts between runs (tens of percent on shared machines), their ratio much less.
            ratios = [a / b for a, b in zip(values, baseline[kind])]
            out[f"{kind}_tokens_per_s"] = statistics.median(values)
            out[f"{kind}_spread"] = [min(values), max(values)]
            out[f"{kind}_speedup"] = statistics.median(ratios)
            out[f"{kind}_speedup_spread"] = [min(ratios), max(ratios)]
    return measured


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
