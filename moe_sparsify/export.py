"""Write the slimmed checkpoint by streaming tensors from the source shards.

1. Refuse bad targets first: an existing output (without overwrite), a target
   inside the source, a plan with per-layer expert counts.
2. For each source shard, read tensors one at a time with `safe_open`: drop
   removed per-expert tensors and renumber the rest; gather kept rows of
   stacked expert tensors and router rows (one `get_slice` per kept expert,
   since slices take ranges, not index lists); copy everything else.
3. Write shards and index, config.json with the new expert count, tokenizer and
   generation files, the plan and a provenance record into a temporary
   directory; verify by reloading it with stock transformers and comparing
   logits with the source model routed as if the experts were gone; then
   rename into place. A failure at any step leaves no output behind.

A quantized checkpoint (see `quant`) is exported in its own format: raw codes,
scales and zero points are copied byte for byte, per-expert ones renamed and
fused ones sliced along the expert axis like their float counterparts; the
export is decoded for verification by transformers where its decode is exact,
else by the format's reference decode, never by the decode the search used.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import __version__, quant
from .adapters import MoEAdapter, adapter_for
from .errors import FailedRun, UsageError
from .files import save_tensors
from .model_card import CARD_FILE, EVALS_FILE, PROVENANCE_FILE, render_card
from .models import load_config, load_decoded, load_pretrained, load_weights
from .mtp import drop_mtp_config, mtp_layer_count, mtp_tensor_filter
from .outputs import check_output, replacing, writing
from .plan import Plan
from .quant.base import QuantFormat
from .quant.reader import DequantizingReader
from .recover import recoverable_parameters
from .streaming import INDEX, CheckpointReader, streamed_logits

PLAN_FILE = "moe_sparsify_plan.yaml"
THRESHOLDS_FILE = "moe_sparsify_thresholds.json"
VERIFY_TOLERANCE = 1e-4
_EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")


class VerificationFailed(FailedRun):
    """The export disagrees with the masked source: the plan may rest on a wrong decode of the weights."""


# Files of the source directory that describe weights this export rewrites.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
# A source's own plan or thresholds describe the source, not the export.
# The source's README.md is not copied over the export's card: model_card.py keeps it as a section.
_NOT_COPIED_NAMES = {
    "config.json",
    INDEX,
    "pytorch_model.bin.index.json",
    PLAN_FILE,
    PROVENANCE_FILE,
    THRESHOLDS_FILE,
    CARD_FILE,
    EVALS_FILE,
}


def estimated_output_bytes(source_dir: Path, keep: int, num_experts: int) -> int:
    """A lower bound of the export's size: the source weights scaled by the share of experts kept
    (experts dominate an MoE checkpoint; the rest is copied whole, so the export is at least this)."""
    weights = sum(p.stat().st_size for p in Path(source_dir).glob("*.safetensors"))
    return weights * keep // max(num_experts, 1)


def source_shards(source_dir: Path) -> list[str]:
    index = source_dir / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (source_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UsageError(
        f"{source_dir} has no safetensors weights; re-save the model with save_pretrained(safe_serialization=True)"
    )


def _gather_experts(handle, name: str, kept: list[int], num_experts: int) -> torch.Tensor:
    """The kept entries along the tensor's expert axis: dim 0 (stacked experts, router rows), read row
    by row so a large stacked tensor is never whole in memory; else the first axis of n entries."""
    view = handle.get_slice(name)
    shape = view.get_shape()
    if shape[0] == num_experts:
        return torch.stack([view[r] for r in kept])
    axis = shape.index(num_experts)
    return handle.get_tensor(name).index_select(axis, torch.tensor(kept)).contiguous()


def check_quantized_source(model_dir: Path, adapter: MoEAdapter) -> QuantFormat | None:
    """The checkpoint's quantization format (None: float), refusing before any work what the export
    cannot copy as is: a quantized router or flattened expert block loses rows inside scale blocks."""
    fmt = quant.detect(model_dir)
    if fmt is None:
        return None
    for logical in fmt.group(CheckpointReader(model_dir).weight_map):
        rule = adapter.tensor_rule(logical)
        if rule is not None and rule.kind in ("router", "flat"):
            raise UsageError(
                f"{logical} is stored {fmt.label}; its expert rows cannot be removed without requantizing "
                "it; pass the float checkpoint"
            )
    return fmt


def _slim_shard(
    handle,
    adapter: MoEAdapter,
    kept: dict[int, list[int]],
    dropped,
    fmt: QuantFormat | None,
    recovered: dict[int, object] | None = None,
    merged: bool = False,
) -> dict[str, torch.Tensor]:
    """recovered: MoE layer -> its block in memory, whose re-fitted tensors replace the source's (with
    merged, every expert tensor: merging changes gate and up projections too)."""
    out: dict[str, torch.Tensor] = {}
    for name in handle.keys():
        if dropped(name):
            continue
        rule = adapter.tensor_rule(name)
        if rule is None and fmt is not None:  # a fused tensor's scales: sliced like the codes they scale
            rule = adapter.tensor_rule(fmt.export_alias(name))
        if rule is None or rule.layer not in kept:
            out[name] = handle.get_tensor(name)
            continue
        if recovered and rule.layer in recovered:
            value = adapter.recovered_tensor(recovered[rule.layer], name, rule, whole_experts=merged)
            if value is not None:
                out.update(_slim_recovered(handle, name, rule, value, kept[rule.layer], adapter.num_experts))
                continue
        if rule.kind == "expert":
            if rule.expert in kept[rule.layer]:
                out[rule.renamed(kept[rule.layer].index(rule.expert))] = handle.get_tensor(name)
        elif rule.kind == "flat":  # each expert a block of rows, read block by block
            view = handle.get_slice(name)
            out[name] = torch.cat([view[e * rule.rows : (e + 1) * rule.rows] for e in kept[rule.layer]])
        else:  # stacked experts, router rows and biases
            out[name] = _gather_experts(handle, name, kept[rule.layer], adapter.num_experts)
    return out


def _slim_recovered(handle, name: str, rule, value: torch.Tensor, kept: list[int], num_experts: int) -> dict:
    """A re-fitted tensor from memory, in the source tensor's dtype, sliced to the kept experts."""
    value = value.detach().cpu().to(handle.get_slice(name)[:1].dtype)
    if rule.kind == "expert":
        return {rule.renamed(kept.index(rule.expert)): value.contiguous()} if rule.expert in kept else {}
    axis = 0 if value.shape[0] == num_experts else list(value.shape).index(num_experts)
    return {name: value.index_select(axis, torch.tensor(kept)).contiguous()}


def _text_config(source_dir: Path, adapter: MoEAdapter) -> dict:
    config = json.loads((source_dir / "config.json").read_text())
    return config[adapter.config_section] if adapter.config_section else config


def _write_weights(
    source_dir: Path,
    tmp: Path,
    adapter: MoEAdapter,
    kept: dict[int, list[int]],
    fmt: QuantFormat | None,
    recovered: dict | None = None,
    merged: bool = False,
) -> int:
    """Returns the number of MTP tensors dropped (see mtp.py)."""
    shards = source_shards(source_dir)
    is_mtp = mtp_tensor_filter(_text_config(source_dir, adapter))
    dropped: list[str] = []

    def drop(name: str) -> bool:
        if is_mtp(name):
            dropped.append(name)
            return True
        return False

    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        try:
            with safe_open(source_dir / shard, framework="pt") as handle:
                tensors = _slim_shard(handle, adapter, kept, drop, fmt, recovered, merged)
                metadata = handle.metadata() or {"format": "pt"}
        except (SafetensorError, OSError) as exc:
            raise FailedRun(f"cannot read {source_dir / shard}: {exc}; re-download or re-save the checkpoint") from None
        target = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / target, metadata=metadata)
        weight_map.update({name: target for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(dropped)


def check_expert_ids(directory: Path, keep: int) -> None:
    """Every per-expert tensor written names an expert below `keep`. Read back from the files, by name
    alone, so it also covers tensors stock transformers ignores on load (which logit verification
    cannot see), such as MTP layers' experts."""
    for shard in source_shards(directory):
        with safe_open(directory / shard, framework="pt") as handle:
            for name in handle.keys():
                match = _EXPERT_ID.search(name)
                if match and int(match[1]) >= keep:
                    raise FailedRun(
                        f"exported tensor {name} names expert {match[1]} but the config keeps {keep}; this is a bug: "
                        "report it with the plan"
                    )


def _write_config(
    source_dir: Path, tmp: Path, adapter: MoEAdapter, kept: dict[int, list[int]], keep: int, fmt: QuantFormat | None
) -> list[str]:
    config = json.loads((source_dir / "config.json").read_text())
    section = adapter.config_section  # a multimodal checkpoint's language model config
    text = config[section] if section else config
    changes = adapter.pruned_config(text, keep) + drop_mtp_config(text)
    changes = [f"{section}.{change}" for change in changes] if section else changes
    if fmt is not None:  # kept as it is, but for module lists that name experts
        changes += fmt.pruned_config(quant.quantization_config(config), kept)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return changes


def _copy_side_files(source_dir: Path, tmp: Path) -> None:
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED_NAMES and not path.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(path, tmp / path.name)


def _load_export(exported_dir: Path, fmt: QuantFormat | None):
    """(the export as a float32 CPU model, how it was decoded), never through the decode the search used."""
    if fmt is None:
        return load_pretrained(exported_dir, torch.float32), "transformers' load of the export"
    reader = DequantizingReader(CheckpointReader(exported_dir), fmt)
    exact = fmt.transformers_decodes(reader.shapes())
    reader.close()
    if exact:
        model = load_pretrained(exported_dir, torch.float32, **fmt.transformers_load_kwargs())
        return model, f"transformers' own {fmt.label} dequantization of the export"
    how = f"{_reference_note(fmt)} (transformers' own decode is not exact for these shapes)"
    return load_decoded(exported_dir, torch.float32, reference_decode=True).eval(), how


def _reference_note(fmt: QuantFormat) -> str:
    return f"the export decoded by the {fmt.label} reference decode, written apart from the search's"


@torch.no_grad()
def verify_export(
    source_dir: Path, original, adapter: MoEAdapter, plan: Plan, exported_dir: Path, token_ids: torch.Tensor
) -> tuple[float, str]:
    """(max abs logit difference between the export and the masked source, both float32 on the CPU,
    what the export was decoded by).

    The in-memory model serves as the reference when it already is float32 on the CPU; otherwise
    (bf16 search, GPU) the source is reloaded in float32 so rounding is not mistaken for a bug, and
    parameters re-fitted in memory (`prune --recover`) are copied into it, module to module.
    """
    exported, how = _load_export(exported_dir, quant.detect(exported_dir))
    first = next(original.parameters()) if original is not None else None
    if first is not None and first.dtype == torch.float32 and first.device.type == "cpu":
        reference = original
    else:
        reference = load_weights(source_dir, torch.float32)
        if plan.options.get("recover"):
            _copy_recovered(original, reference, adapter, list(plan.kept()), merged_experts(plan))
    with adapter.pruned_view(reference, plan.kept()):
        expected = reference(input_ids=token_ids, use_cache=False).logits
    got = exported(input_ids=token_ids, use_cache=False).logits
    return (got - expected).abs().max().item(), how


def merged_experts(plan: Plan) -> bool:
    """Whether the plan's recovery merged experts (which changes every expert tensor, not only down_proj)."""
    return "merge" in (plan.options.get("recover") or {}).get("methods", ())


def _copy_recovered(model, reference, adapter: MoEAdapter, layers: list[int], merged: bool) -> None:
    """Copy every parameter recovery may change from `model` into `reference`, by module, not by file name."""
    for index in layers:
        source = adapter.moe_block(adapter.decoder_layers(model)[index])
        target = adapter.moe_block(adapter.decoder_layers(reference)[index])
        pairs = zip(recoverable_parameters(adapter, source, merged), recoverable_parameters(adapter, target, merged))
        for src, dst in pairs:
            dst.data.copy_(src.detach().to(device=dst.device, dtype=dst.dtype))


def verify_streamed(
    source_dir: Path, adapter: MoEAdapter, plan: Plan, exported_dir: Path, token_ids
) -> tuple[float, str]:
    """`verify_export` for models larger than memory: both models run one decoder layer at a time; a
    quantized export is decoded by its format's reference decode."""
    fmt = quant.detect(exported_dir)
    exported_adapter = adapter_for(load_config(exported_dir))
    exported = streamed_logits(exported_dir, exported_adapter, token_ids, reference_decode=True)
    expected = streamed_logits(source_dir, adapter, token_ids, kept=plan.kept())
    how = "the export streamed layer by layer" + (f"; {_reference_note(fmt)}" if fmt else "")
    return (exported - expected).abs().max().item(), how


def _mtp_record(source_dir: Path, adapter: MoEAdapter, tensors: int) -> dict:
    layers = mtp_layer_count(_text_config(source_dir, adapter))
    if not layers and not tensors:
        return {"source_layers": 0, "action": "none"}
    return {
        "source_layers": layers,
        "tensors_dropped": tensors,
        "action": "dropped: transformers has no forward to search or verify them on; count set to 0",
    }


def _quantization_record(fmt: QuantFormat | None) -> dict:
    """The provenance's `quantization` entry for a quantized export (none for a float one)."""
    if fmt is None:
        return {}
    return {
        "quantization": {
            "format": fmt.label,
            "quant_method": fmt.quant_method,
            "export": "kept experts' raw tensors and every other tensor copied byte for byte; not requantized",
        }
    }


def export_checkpoint(
    source_dir: Path,
    output: Path,
    plan: Plan,
    adapter: MoEAdapter,
    original_model,
    verify_tokens: torch.Tensor,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    streamed: bool = False,
) -> dict:
    """Returns the provenance record (config changes, verification diff). Where the plan says kept weights
    were re-fitted (`recover` in its options), those tensors are read from `original_model`, which holds them."""
    source_dir, output = Path(source_dir), Path(output)
    check_output(output, "directory", overwrite, inputs=(source_dir,))
    keep = plan.uniform_keep()
    if keep is None:
        raise UsageError("the plan keeps different expert counts per layer; stock transformers configs hold one count")
    fmt = check_quantized_source(source_dir, adapter)
    if fmt is not None:
        fmt.check_requirements()
    with replacing(output, overwrite) as tmp, writing(output):
        tmp.mkdir()
        recovered = None
        if plan.options.get("recover"):
            layers = adapter.decoder_layers(original_model)
            recovered = {index: adapter.moe_block(layers[index]) for index in plan.kept()}
        mtp_tensors = _write_weights(source_dir, tmp, adapter, plan.kept(), fmt, recovered, merged_experts(plan))
        check_expert_ids(tmp, keep)
        changes = _write_config(source_dir, tmp, adapter, plan.kept(), keep, fmt)
        _copy_side_files(source_dir, tmp)
        plan.save(tmp / PLAN_FILE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if streamed:
            diff, how = verify_streamed(source_dir, adapter, plan, tmp, verify_tokens)
        else:
            diff, how = verify_export(source_dir, original_model, adapter, plan, tmp, verify_tokens)
        if not diff <= VERIFY_TOLERANCE:
            raise VerificationFailed(
                f"exported checkpoint disagrees with the pruned source model (max logit diff {diff:.3g} > "
                f"{VERIFY_TOLERANCE}); this is a bug: report it with the plan"
            )
        provenance = {
            "source": plan.source,
            "source_dir": str(source_dir),
            "plan_sha256": plan.sha256(),
            "config_changes": changes,
            "mtp_layers": _mtp_record(source_dir, adapter, mtp_tensors),
            "verified_max_abs_logit_diff": diff,
            "verified_on_tokens": int(verify_tokens.numel()),
            "verify_tolerance": VERIFY_TOLERANCE,
            "verified_by": how,
            "moe_sparsify": __version__,
            **_quantization_record(fmt),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(render_card(source_dir, plan, provenance))
    return provenance
