"""Run settings: built-in defaults < model alias defaults < --config YAML < flags.

Unknown keys and bad values are collected and reported together, before any
model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .divergence import DIVERGENCES
from .errors import UsageError
from .models import DTYPES, model_aliases
from .search import DEFAULT_E2E_SHORTLIST, DEFAULT_MAX_SUBSETS, STRATEGIES
from .skipping import SKIP_RULES

MODES = ("layerwise", "progressive")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Settings:
    model: str = "tiny"
    keep: int | None = None
    strategy: str = "auto"  # auto: exhaustive up to max_subsets subsets per layer, greedy beyond
    mode: str = "layerwise"  # layerwise: original inputs per layer (the paper); progressive: pruned inputs
    calibration: str | list = "bundled"
    samples: int = 128  # the paper: 128 sequences of 2048 tokens
    seq_len: int = 2048
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8  # sequences per forward during calibration
    max_subsets: int = DEFAULT_MAX_SUBSETS  # exhaustive refuses above this many subsets per layer
    beam: int = 1  # greedy beam width
    e2e_shortlist: int = DEFAULT_E2E_SHORTLIST  # e2e: subsets per layer re-scored end to end
    e2e_samples: int = 64  # e2e: calibration sequences the divergence is measured on (whole batches)
    e2e_divergence: str = "kl"  # e2e: kl = KL(original || pruned), reverse_kl, or js
    output: str | None = None
    overwrite: bool = False
    plan_only: bool = False
    from_calibration: str | None = None  # a directory written by `calibrate`
    stream: bool = False  # prune: keep decoder layers on disk, load one at a time (models larger than memory)
    activations_device_gb: float | None = None  # activations kept on the compute device (default 40 % of free)
    activations_cpu_gb: float | None = None  # then in CPU memory (default 40 % of available); beyond: disk
    offload_dir: str | None = None  # where activations beyond both go, memory-mapped (default: system temp)
    verify_samples: int = 4  # calibration sequences the exported checkpoint is checked on
    skip_rule: str | None = None  # ratio (top-2, the paper) or tail (top-k); default by top_k
    quantile: float | None = None  # skip-profile statistic; 0.5 (the paper's median) unless target_skip
    target_skip: float | None = None  # or: the share of (token, expert) pairs to skip on calibration tokens
    eval_text: str = "bundled:heldout"
    eval_window: int = 256
    eval_stride: int = 128
    tasks: list[str] = field(default_factory=list)  # eval: lm-eval tasks (pydoc_cloze is bundled)
    task_dirs: list[str] = field(default_factory=list)  # eval: directories of lm-eval task YAML
    num_fewshot: int | None = None  # eval: the harness default per task when unset
    task_limit: int | None = None  # eval: documents per task (for quick runs)
    speed_batch: list[int] = field(default_factory=lambda: [1])  # eval --compare: batch sizes (first = headline)
    prompt_len: int = 64  # eval --compare: prompt tokens per sequence
    new_tokens: int = 32  # eval --compare: greedy tokens generated per sequence
    repeats: int = 3  # eval --compare: timed rounds after one warm-up round

    def to_dict(self) -> dict:
        return asdict(self)

    def skip_statistic(self) -> dict:
        if self.target_skip is not None:
            return {"kind": "target_skip", "value": float(self.target_skip)}
        return {"kind": "quantile", "value": float(0.5 if self.quantile is None else self.quantile)}


KNOWN_KEYS = {f.name for f in fields(Settings)}


def _validate(s: Settings) -> list[str]:
    errors = []

    def positive(name: str) -> None:
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            errors.append(f"{name}: must be a positive integer, got {value!r}")

    for name in (
        "samples",
        "seq_len",
        "batch_size",
        "max_subsets",
        "beam",
        "verify_samples",
        "eval_window",
        "eval_stride",
        "e2e_shortlist",
        "e2e_samples",
        "prompt_len",
        "repeats",
    ):
        positive(name)
    if s.keep is not None:
        positive("keep")
    if not isinstance(s.seed, int) or isinstance(s.seed, bool):
        errors.append(f"seed: must be an integer, got {s.seed!r}")
    if s.strategy != "auto" and s.strategy not in STRATEGIES:
        errors.append(f"strategy: {s.strategy!r} is not one of auto, {', '.join(sorted(STRATEGIES))}")
    if s.mode not in MODES:
        errors.append(f"mode: {s.mode!r} is not one of {', '.join(MODES)}")
    if s.device not in DEVICES and not str(s.device).startswith("cuda:"):
        errors.append(f"device: {s.device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if s.dtype != "auto" and s.dtype not in DTYPES:
        errors.append(f"dtype: {s.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    for name in ("tasks", "task_dirs"):
        value = getattr(s, name)
        if isinstance(value, str):
            setattr(s, name, [part for part in value.split(",") if part])
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f"{name}: must be a list of names, got {value!r}")
    batches = s.speed_batch
    if isinstance(batches, (int, str)):
        try:
            batches = [int(b) for b in str(batches).split(",") if b]
        except ValueError:
            batches = None
    if not batches or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches):
        errors.append(f"speed_batch: must be positive integers, e.g. 1,8, got {s.speed_batch!r}")
    else:
        s.speed_batch = batches
    for name in ("num_fewshot", "task_limit"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            errors.append(f"{name}: must be a non-negative integer, got {value!r}")
    if not isinstance(s.new_tokens, int) or s.new_tokens < 2:
        errors.append(f"new_tokens: must be an integer of at least 2, got {s.new_tokens!r}")
    if s.e2e_divergence not in DIVERGENCES:
        errors.append(f"e2e_divergence: {s.e2e_divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if s.skip_rule is not None and s.skip_rule not in SKIP_RULES:
        errors.append(f"skip_rule: {s.skip_rule!r} is not one of {', '.join(SKIP_RULES)}")
    if s.quantile is not None and s.target_skip is not None:
        errors.append("quantile and target_skip: give one statistic, not both")
    for name in ("activations_device_gb", "activations_cpu_gb"):
        value = getattr(s, name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            errors.append(f"{name}: must be a non-negative number of GiB, got {value!r}")
    for name in ("quantile", "target_skip"):
        value = getattr(s, name)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
            errors.append(f"{name}: must be a number in [0, 1), got {value!r}")
    if isinstance(s.eval_window, int) and isinstance(s.eval_stride, int) and s.eval_stride > s.eval_window:
        errors.append(f"eval_stride: {s.eval_stride} is larger than eval_window {s.eval_window}")
    return errors


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError:
        raise UsageError(f"cannot read config {path}; check the --config path") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of setting: value")
    return data


def _alias_defaults_for(model: str) -> dict:
    """The alias entry of `model`, or of the model an exported checkpoint was pruned from, so that
    `--model tiny-keep6` calibrates like `--model tiny`."""
    aliases = model_aliases()
    if model in aliases:
        return aliases[model]
    provenance = Path(model) / "moe_sparsify_provenance.json"
    try:
        source = json.loads(provenance.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return {}
    return aliases.get(source, {}) if isinstance(source, str) else {}


def resolve_settings(config_file: Path | None, flags: dict) -> Settings:
    """flags: values the user passed on the command line (None = not given)."""
    given = {k: v for k, v in flags.items() if v is not None}
    from_file = _read_yaml(config_file) if config_file else {}
    errors = [
        f"{k}: unknown setting in {config_file} (known: {', '.join(sorted(KNOWN_KEYS))})"
        for k in from_file
        if k not in KNOWN_KEYS
    ]
    model = given.get("model", from_file.get("model", Settings.model))
    alias = _alias_defaults_for(model)
    alias_defaults = {k: v for k, v in alias.items() if k != "path"}
    errors += [
        f"{k}: unknown setting in the alias {model!r} of configs/models.yaml"
        for k in alias_defaults
        if k not in KNOWN_KEYS
    ]
    merged = {**alias_defaults, **{k: v for k, v in from_file.items() if k in KNOWN_KEYS}, **given}
    settings = Settings(**{k: v for k, v in merged.items() if k in KNOWN_KEYS})
    errors += _validate(settings)
    if errors:
        raise UsageError("invalid settings: " + "; ".join(errors))
    return settings
