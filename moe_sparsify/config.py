"""Run settings: built-in defaults < model alias defaults < --config YAML < flags.

Unknown keys and bad values are collected and reported together, before any
model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    with_config,
)

from .aliases import configs_dir, model_aliases
from .choices import (
    DEFAULT_MAX_SUBSETS,
    DEFAULT_MERGE_BY,
    DEFAULT_RECOVER_HOLDOUT,
    DEFAULT_SKIP_QUANTILE,
    DEVICES,
    DIVERGENCES,
    DTYPES,
    E2E_DEFAULTS,
    MERGE_BY,
    MODES,
    RECOVERY_METHODS,
    SKIP_RULES,
    STRATEGIES,
)
from .errors import UsageError, first_line
from .files import DOCUMENT_CONFIG, describe_errors, load_yaml, named_twice
from .model_card import PROVENANCE_FILE
from .outputs import creation_error


def _device(value: str) -> str:
    if value not in DEVICES and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError(f"must be one of {', '.join(DEVICES)} or cuda:N")
    return value


def _directory(value: str) -> str:
    if not Path(value).is_dir():
        raise ValueError(f"{value} is not a directory; create it or pass another")
    return value


def _writable_directory(value: str) -> str:
    """A directory that takes new files: tried, since root passes access() on /proc and read-only mounts."""
    if not os.access(_directory(value), os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {value}; pass a writable directory")
    refused = creation_error(Path(value) / f".moe-sparsify-probe-{os.getpid()}")
    if refused is not None:
        raise ValueError(f"cannot create files in {value} ({refused.strerror}); pass a writable directory")
    return value


def _comma_separated(value):
    """`--tasks a,b` and `tasks: [a, b]` alike."""
    return [part for part in value.split(",") if part] if isinstance(value, str) else value


def _distinct(values: list) -> list:
    twice = named_twice(values)
    if twice:
        raise ValueError(f"{twice[0]!r} is named twice; name each once")
    return values


def _batch_sizes(value):
    """`--batch 1,8`, `speed_batch: 4` or `speed_batch: [1, 8]`."""
    if isinstance(value, str):
        try:
            return [int(part) for part in value.split(",") if part]
        except ValueError:
            raise ValueError("must be positive integers, e.g. 1,8") from None
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _calibration_spec(value):
    """A spec string, or a list of sources (strings or {source, weight})."""
    fix = "give a source (bundled, a file, hf:NAME, a=0.7,b=0.3) or a list of them"
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{fix}, not {type(value).__name__} {value!r}")
    for item in value:
        if isinstance(item, str):
            continue
        if not isinstance(item, dict) or set(item) - {"source", "weight"} or not isinstance(item.get("source"), str):
            raise ValueError(f"list item {item!r} must be a source or {{source: NAME, weight: NUMBER}}; {fix}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"weight {weight!r} of {item['source']!r} must be a number")
    return value


PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
# Floats are finite: YAML's .inf and .nan (and --time-budget inf) would pass a `ge=0` bound and then
# loop for ever or poison every comparison.
Float = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # StrictFloat takes ints too (0 is a share)
Share = Annotated[Float, Field(ge=0, lt=1)]
GiB = Annotated[Float, Field(ge=0)]
PositiveFiniteFloat = Annotated[Float, Field(gt=0)]
# A path or a name: an empty one would silently mean "the default" (`-o ''`) or the working directory.
Name = Annotated[StrictStr, Field(min_length=1)]
# numpy's range, which every seeded library takes; torch's own is wider, but the random strategy scales it.
Seed = Annotated[StrictInt, Field(ge=0, lt=2**32)]
Names = Annotated[list[StrictStr], BeforeValidator(_comma_separated)]
WritableDirectory = Annotated[Name, AfterValidator(_writable_directory)]
Directories = Annotated[list[Annotated[Name, AfterValidator(_directory)]], BeforeValidator(_comma_separated)]
BatchSizes = Annotated[list[PositiveInt], Field(min_length=1), BeforeValidator(_batch_sizes)]


@with_config(DOCUMENT_CONFIG)
@dataclass
class Settings:
    model: Name = "tiny"
    keep: PositiveInt | None = None
    # auto: exhaustive up to max_subsets subsets per layer, greedy beyond
    strategy: Literal[("auto", *STRATEGIES)] = "auto"
    # layerwise: original inputs per layer (the paper's default); progressive: pruned inputs, target the layer's
    # own output on them; compensating: pruned inputs, target the original model's output (the paper's progressive)
    mode: Literal[MODES] = "layerwise"
    calibration: Annotated[str | list, BeforeValidator(_calibration_spec)] = "bundled"
    samples: PositiveInt = 128  # the paper: 128 sequences of 2048 tokens
    seq_len: PositiveInt = 2048
    seed: Seed = 0
    device: Annotated[Name, AfterValidator(_device)] = "auto"
    dtype: Literal[("auto", *DTYPES)] = "auto"
    batch_size: PositiveInt = 8  # sequences per forward during calibration
    max_subsets: PositiveInt = DEFAULT_MAX_SUBSETS  # exhaustive refuses above this many subsets per layer
    beam: PositiveInt = 1  # greedy beam width
    # e2e and e2e-fast; unset: the strategy's default (choices.E2E_DEFAULTS)
    e2e_shortlist: PositiveInt | None = None  # subsets per layer re-scored end to end
    e2e_samples: PositiveInt | None = None  # calibration sequences the divergence is measured on (whole batches)
    # later layers run before reading the divergence (the final norm and head on that hidden state)
    e2e_horizon: NonNegativeInt | None = None
    # race the shortlist a batch of sequences at a time, dropping a subset once its paired per-sequence
    # divergence differences to the leader's are this many standard errors above zero
    e2e_race_z: PositiveFiniteFloat | None = None
    # the first this many MoE layers read the divergence at the logits whatever e2e_horizon says: an early
    # layer's error passes through every later layer, which a short horizon does not see
    e2e_logits_layers: NonNegativeInt | None = None
    e2e_divergence: Literal[DIVERGENCES] = "kl"  # kl = KL(original || pruned), reverse_kl, or js
    # after each layer's search, in this order: merge, router, refit (prune --recover merge,router,refit)
    recover: Annotated[
        list[Literal[RECOVERY_METHODS]], BeforeValidator(_comma_separated), AfterValidator(_distinct)
    ] = field(default_factory=list)
    recover_holdout: Annotated[Float, Field(gt=0, lt=1)] = DEFAULT_RECOVER_HOLDOUT  # held back as a guard
    # --recover merge: join each removed expert to the kept one closest by mean output, or by router logits
    recover_merge_by: Literal[MERGE_BY] = DEFAULT_MERGE_BY
    # --recover merge: permute each removed expert's neurons to best match its kept expert's before averaging
    recover_merge_align: StrictBool = False
    output: Name | None = None
    overwrite: StrictBool = False
    plan_only: StrictBool = False
    from_calibration: Name | None = None  # a directory written by `calibrate`
    stream: StrictBool = False  # prune: keep decoder layers on disk, load one at a time (models larger than memory)
    activations_device_gb: GiB | None = None  # activations kept on the compute device (default 40 % of free)
    activations_cpu_gb: GiB | None = None  # then in CPU memory (default 40 % of available); beyond: disk
    offload_dir: WritableDirectory | None = None  # where activations beyond both go, memory-mapped (default: temp)
    verify_samples: PositiveInt = 4  # calibration sequences the exported checkpoint is checked on
    skip_rule: Literal[SKIP_RULES] | None = None  # ratio (top-2, the paper) or tail (top-k); default by top_k
    quantile: Share | None = None  # skip-profile statistic; DEFAULT_SKIP_QUANTILE unless target_skip
    target_skip: Share | None = None  # or: the share of (token, expert) pairs to skip on calibration tokens
    eval_text: Name = "bundled:heldout"
    eval_window: PositiveInt = 256
    eval_stride: PositiveInt = 128
    perplexity: StrictBool = True  # eval: measure perplexity (off: only --tasks)
    # eval: lm-eval tasks (pydoc_cloze is bundled)
    tasks: Annotated[Names, AfterValidator(_distinct)] = field(default_factory=list)
    task_dirs: Directories = field(default_factory=list)  # eval: directories of lm-eval task YAML
    num_fewshot: NonNegativeInt | None = None  # eval: the harness default per task when unset
    task_limit: PositiveInt | None = None  # eval: documents per task (for quick runs; 0 would score none)
    # eval --compare: batch sizes (first = headline)
    speed_batch: BatchSizes = field(default_factory=lambda: [1])
    prompt_len: PositiveInt = 64  # eval --compare: prompt tokens per sequence
    new_tokens: Annotated[StrictInt, Field(ge=2)] = 32  # eval --compare: greedy tokens generated per sequence
    repeats: PositiveInt = 3  # eval --compare: fewest timed rounds after one warm-up round
    # eval --compare: seconds of further timed rounds while the speed-ups are unsettled
    speed_budget_s: Annotated[Float, Field(ge=0)] = 60.0

    def to_dict(self) -> dict:
        return asdict(self)

    def end_to_end(self, strategy: str) -> dict:
        """The e2e settings `strategy` runs with: those given, else its defaults."""
        given = {key: getattr(self, key) for key in E2E_DEFAULTS[strategy]}
        return {key: default if given[key] is None else given[key] for key, default in E2E_DEFAULTS[strategy].items()}

    def skip_statistic(self) -> dict:
        if self.target_skip is not None:
            return {"kind": "target_skip", "value": float(self.target_skip)}
        return {"kind": "quantile", "value": float(DEFAULT_SKIP_QUANTILE if self.quantile is None else self.quantile)}


KNOWN_KEYS = {f.name for f in fields(Settings)}


_VALIDATOR = TypeAdapter(Settings)


def _cross_field_errors(s: Settings) -> list[str]:
    errors = []
    if s.quantile is not None and s.target_skip is not None:
        errors.append("quantile and target_skip: give one statistic, not both")
    if s.eval_stride >= s.eval_window:  # each window's first scored token needs a token of context before it
        errors.append(f"eval_stride: {s.eval_stride} is not smaller than eval_window {s.eval_window}")
    if s.strategy == "e2e" and s.e2e_horizon is None and s.e2e_logits_layers is not None:
        errors.append(
            "e2e_logits_layers: strategy e2e without e2e_horizon reads every layer at the logits already; "
            "set e2e_horizon (or use --strategy e2e-fast) or drop it"
        )
    if "merge" not in s.recover:  # a merge setting without a merge would be silently ignored
        errors += [
            f"{key}: applies to --recover merge, which this run does not do; add merge to recover or drop {key}"
            for key in ("recover_merge_by", "recover_merge_align")
            if getattr(s, key) != getattr(Settings, key)  # changed from its default
        ]
    return errors


def find_config(spec: str | Path) -> Path:
    """A --config file: a path, or the name of an example shipped with the package (`tiny-keep6`), so the
    examples work outside a clone of the repository."""
    path = Path(spec)
    if path.is_file() or len(path.parts) > 1:  # not exists(): `tiny-keep6` may also be a checkpoint directory
        return path
    shipped = configs_dir() / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file() and shipped.name != "models.yaml":
        return shipped
    names = sorted(p.stem for p in configs_dir().glob("*.yaml") if p.name != "models.yaml")
    raise UsageError(f"config {spec} not found; give a YAML file or a shipped example: {', '.join(names)}")


def _read_yaml(path: Path) -> dict:
    if Path(path).exists() and not Path(path).is_file():  # a directory, or a FIFO that would block for ever
        raise UsageError(f"config {path} is not a regular file; check the --config path")
    try:
        data = load_yaml(Path(path).read_text())
    except OSError:
        raise UsageError(f"cannot read config {path}; check the --config path") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"config {path} is not valid YAML: {first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of setting: value")
    return data


def _alias_defaults_for(model: str) -> dict:
    """The alias entry of `model`, or of the model an exported checkpoint was pruned from, so that
    `--model tiny-keep6` calibrates like `--model tiny`. A model that is not a string (a YAML mapping)
    has none: validation then names its type."""
    if not isinstance(model, str) or not model:
        return {}
    aliases = model_aliases()
    if model in aliases:
        return aliases[model]
    provenance = Path(model) / PROVENANCE_FILE
    try:
        source = json.loads(provenance.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return {}
    return aliases.get(source, {}) if isinstance(source, str) else {}


def _known_like(key) -> str:
    """`did you mean keep?` for `Keep` or `kepp`, else the whole list of settings."""
    import difflib

    lowered = {name.lower(): name for name in KNOWN_KEYS}
    close = difflib.get_close_matches(str(key).lower(), lowered, n=1, cutoff=0.75)
    return f"did you mean {lowered[close[0]]}?" if close else f"known: {', '.join(sorted(KNOWN_KEYS))}"


def resolve_settings(config_file: Path | None, flags: dict) -> Settings:
    """flags: values the user passed on the command line (None = not given)."""
    given = {k: v for k, v in flags.items() if v is not None}
    config_file = find_config(config_file) if config_file else None
    from_file = _read_yaml(config_file) if config_file else {}
    kind = from_file.get("kind")
    if isinstance(kind, str) and kind.startswith("moe-sparsify-"):  # a plan or threshold file, not settings
        raise UsageError(f"config {config_file} is a {kind} file, not settings; pass it with its own flag (--plan ...)")
    errors = [f"{k}: unknown setting in {config_file} ({_known_like(k)})" for k in from_file if k not in KNOWN_KEYS]
    model = given.get("model", from_file.get("model", Settings.model))
    alias = _alias_defaults_for(model)
    alias_defaults = {k: v for k, v in alias.items() if k != "path"}
    errors += [
        f"{k}: unknown setting in the alias {model!r} of configs/models.yaml"
        for k in alias_defaults
        if k not in KNOWN_KEYS
    ]
    merged = {**alias_defaults, **{k: v for k, v in from_file.items() if k in KNOWN_KEYS}, **given}
    try:
        settings = _VALIDATOR.validate_python({k: v for k, v in merged.items() if k in KNOWN_KEYS})
    except ValidationError as exc:
        raise UsageError("invalid settings: " + "; ".join([*errors, describe_errors(exc)])) from None
    errors += _cross_field_errors(settings)
    if errors:
        raise UsageError("invalid settings: " + "; ".join(errors))
    return settings
