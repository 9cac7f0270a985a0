"""The exported checkpoint's README.md: hub metadata and the pruning record.

Front matter for the hub (`base_model`, `license` copied from the source's card or config, tags,
`library_name: transformers`), then what was done: strategy, kept experts per layer in the original
numbering, the calibration manifest, plan hash, config changes and the verification result. The
evaluation section starts empty and is filled by `moe-sparsify eval --model EXPORT --card`, which
appends each run to `moe_sparsify_evals.json` beside it: numbers appear only once measured, on this
checkpoint. The source's own card is kept, folded, at the end: its usage notes and license text stay
useful, its benchmark numbers describe the unpruned model and are labelled so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from . import __version__
from .aliases import model_aliases
from .errors import UsageError
from .outputs import write_atomically
from .plan import Plan

CARD_FILE = "README.md"
EVALS_FILE = "moe_sparsify_evals.json"
# Written by export; named here, where `eval --card` recognises an export by it (export imports this module).
PROVENANCE_FILE = "moe_sparsify_provenance.json"
_EVAL_START, _EVAL_END = "<!-- moe-sparsify:evaluation -->", "<!-- /moe-sparsify:evaluation -->"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n?", re.DOTALL)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Hub metadata keys worth carrying over from the source card.
_COPIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "extra_gated_prompt")


def split_front_matter(text: str) -> tuple[dict, str]:
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match[1])
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[match.end() :]


def base_model_id(plan: Plan, source_config: dict) -> str | None:
    """The hub id the export derives from: the source's own `base_model` is its ancestor, not it."""
    aliases = model_aliases()
    candidates = [str(aliases[plan.source]["path"]) if plan.source in aliases else plan.source]
    candidates.append(str(source_config.get("_name_or_path") or ""))
    return next((c for c in candidates if _HUB_ID.match(c) and not Path(c).exists()), None)


def render_card(source_dir: Path, plan: Plan, provenance: dict) -> str:
    source_dir = Path(source_dir)
    source_card = source_dir / CARD_FILE
    source_meta, source_body = split_front_matter(source_card.read_text()) if source_card.is_file() else ({}, "")
    config = json.loads((source_dir / "config.json").read_text())
    meta = {key: source_meta[key] for key in _COPIED_KEYS if key in source_meta}
    if "license" not in meta and isinstance(config.get("license"), str):
        meta["license"] = config["license"]
    base = base_model_id(plan, config)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta.setdefault("pipeline_tag", "text-generation")
    meta["tags"] = ["moe", "mixture-of-experts", "expert-pruning", "moe-sparsify", plan.model.model_type]
    parts = [f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n", _record(plan, provenance, base)]
    parts.append(f"{_EVAL_START}\n{_evaluation([])}{_EVAL_END}\n")
    if source_body.strip():
        parts.append(
            "\n## The source model's card\n\nKept as published. Its numbers describe the model before pruning.\n\n"
            f"<details>\n<summary>Original README.md</summary>\n\n{source_body.strip()}\n\n</details>\n"
        )
    return "\n".join(parts)


def _record(plan: Plan, provenance: dict, base: str | None) -> str:
    keep, n = plan.uniform_keep(), plan.model.num_experts
    name = base or _public_name(plan.source)
    calib = plan.calibration
    lines = [
        f"# {name.rpartition('/')[2]}: {keep} of {n} experts per MoE layer",
        "",
        f"Experts pruned from `{name}` with moe-sparsify "
        "(layer-wise exact reconstruction search, Lu et al. 2024, *Not All Experts are Equal*). "
        "The checkpoint loads in stock transformers; kept experts are renumbered 0..r-1 in their original order.",
        "",
        "## Pruning record",
        "",
        f"- strategy: `{plan.strategy}`, mode: `{plan.mode}`, seed: {plan.seed}",
        f"- experts per MoE layer: {n} -> {keep} (top-k {plan.model.top_k} unchanged)",
        f"- plan sha256: `{provenance['plan_sha256']}` (the plan is `moe_sparsify_plan.yaml` beside this card)",
        f"- config changes: {', '.join(f'`{c}`' for c in provenance['config_changes']) or 'none'}",
    ]
    mtp = provenance.get("mtp_layers", {})
    if mtp.get("source_layers") or mtp.get("tensors_dropped"):
        lines.append(f"- multi-token-prediction layers: {mtp['source_layers']} in the source, {mtp['action']}")
    lines += ["", "### Calibration", ""]
    for source in calib.get("sources", []):
        what = f" ({source['preset']})" if source.get("preset") else ""
        lines.append(
            f"- `{_public_name(source['source'])}`{what}: {source['samples']} sequences, weight {source['weight']}"
        )
    lines += [
        f"- {calib.get('samples')} x {calib.get('seq_len')} tokens, seed {calib.get('seed')}; "
        f"token ids sha256 `{calib.get('token_ids_sha256')}`; manifest sha256 `{calib.get('sha256')}`",
        "",
        "### Verification",
        "",
        f"Logits of this checkpoint compared in float32 with the source model routed as if the removed experts "
        f"were gone ({provenance.get('verified_by', 'see moe_sparsify_provenance.json')}): max abs logit difference "
        f"**{provenance['verified_max_abs_logit_diff']:.3g}** on {provenance['verified_on_tokens']} tokens "
        f"(must be <= {provenance.get('verify_tolerance', 1e-4)}).",
        "",
        "### Kept experts (original ids)",
        "",
        "| layer | kept | loss | best other subset |",
        "|---|---|---|---|",
    ]
    for lp in plan.layers:
        runner = "" if lp.runner_up_loss is None else f"{lp.runner_up_loss:.4g}"
        lines.append(f"| {lp.layer} | {' '.join(map(str, lp.kept))} | {lp.loss:.4g} | {runner} |")
    return "\n".join(lines) + "\n"


def _public_name(spec: str) -> str:
    """A local path shown by its last component: a public card should not carry the author's directories."""
    return Path(spec).name if Path(spec).is_absolute() or Path(spec).exists() else spec


def _evaluation(runs: list[dict]) -> str:
    if not runs:
        return (
            "## Evaluation\n\nNot evaluated yet. `moe-sparsify eval --model THIS_DIR --card` measures this checkpoint "
            "and records the result here.\n"
        )
    lines = ["## Evaluation", "", "Measured on this checkpoint with `moe-sparsify eval --card`.", ""]
    lines += ["| text | window / stride | perplexity | tasks | skipping | dtype | moe-sparsify |", "|---" * 7 + "|"]
    for run in runs:
        tasks = ", ".join(f"{t}: {json.dumps(v, sort_keys=True)}" for t, v in (run.get("tasks") or {}).items())
        skipping = _public_name(run["thresholds"]) if run.get("thresholds") else "off"
        lines.append(
            f"| {_public_name(run['text'])} | {run['window']} / {run['stride']} | {run['perplexity']:.4f} | "
            f"{tasks or '-'} | {skipping} | {run['dtype']} | {run['moe_sparsify']} |"
        )
    return "\n".join(lines) + "\n"


def check_card_target(model_dir: Path) -> None:
    """`eval --card` only on a checkpoint this tool exported; checked before the model loads."""
    if not (Path(model_dir) / PROVENANCE_FILE).is_file() or not (Path(model_dir) / CARD_FILE).is_file():
        raise UsageError(
            f"--card records results in the model card of an export written by moe-sparsify; {model_dir} has no "
            f"{PROVENANCE_FILE} and {CARD_FILE}: export the model first, or drop --card"
        )


def record_eval(model_dir: Path, result: dict) -> str:
    """Append one eval result to the export's evals file and rewrite the card's evaluation section."""
    model_dir = Path(model_dir)
    evals_path, card_path = model_dir / EVALS_FILE, model_dir / CARD_FILE
    runs = json.loads(evals_path.read_text()) if evals_path.is_file() else []
    runs.append(
        {
            "text": result["text"],
            "window": result["window"],
            "stride": result["stride"],
            "perplexity": result["perplexity"],
            "tasks": (result.get("harness") or {}).get("tasks"),
            "thresholds": result.get("thresholds"),
            "dtype": result["dtype"],
            "moe_sparsify": __version__,
        }
    )
    card = card_path.read_text()
    start, end = card.find(_EVAL_START), card.find(_EVAL_END)
    if start < 0 or end < start:
        raise UsageError(f"{card_path} has no moe-sparsify evaluation section; re-export to restore the card")
    card = card[: start + len(_EVAL_START)] + "\n" + _evaluation(runs) + card[end:]
    # Each file whole or not at all: an interrupted run must not leave the card or the evals half written.
    write_atomically(evals_path, json.dumps(runs, indent=2) + "\n")
    write_atomically(card_path, card)
    return str(card_path)
