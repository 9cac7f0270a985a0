"""What each subcommand does, given resolved settings; returns a JSON-able result.

No parsing and no printing of results here (that is `cli.py`); only logs and
progress go to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import compare as cmp
from . import quant
from .adapters import MoEAdapter, adapter_for
from .calibration.offload import ActivationStore, default_budgets
from .calibration.propagate import propagate
from .calibration.sources import check_source, load_documents, parse_sources
from .calibration.store import CalibrationStore, CalibrationWriter, manifest_sha256
from .calibration.tokens import sample_windows, token_stream
from .config import Settings
from .distributed import is_main, process_group, shard, world
from .errors import UsageError
from .evaluate import check_scorable, perplexity
from .export import (
    PLAN_FILE,
    THRESHOLDS_FILE,
    VerificationFailed,
    check_quantized_source,
    estimated_output_bytes,
    export_checkpoint,
)
from .model_card import check_card_target, record_eval
from .models import load_config, load_model, load_tokenizer, load_weights, pick_device, pick_dtype, resolve_model_dir
from .outputs import check_free_space, check_output, holding_outputs, lock_output, writing
from .plan import ModelIdentity, Plan, load_plan
from .progress import progress_reporter, stderr
from .prune import (
    LayerTiming,
    ProgressJournal,
    check_keep,
    check_kept,
    model_identity,
    plan_pruning,
    search_fingerprint,
)
from .skip_rules import check_skip_rule, default_skip_rule
from .skipping import check_skipping_supported, skip_fractions, skipping
from .streaming import StreamedModel
from .system import proc_bytes
from .thresholds import SkipThresholds, load_thresholds, model_fingerprint, profile, routing_weights


@dataclass
class Job:
    """A model resolved and checked, weights not yet loaded."""

    settings: Settings
    model_dir: Path
    adapter: MoEAdapter
    device: torch.device
    dtype: torch.dtype


def open_job(settings: Settings) -> Job:
    model_dir = resolve_model_dir(settings.model)
    quant.detect(model_dir)  # a quantized format we do not handle is refused before any work
    adapter = adapter_for(load_config(model_dir))
    device = pick_device(settings.device)
    return Job(settings, model_dir, adapter, device, pick_dtype(settings.dtype, device))


def check_length(config, tokens: int, flag: str) -> None:
    """Refuse sequences longer than the model's position embeddings before any text is tokenised."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise UsageError(f"{flag} {tokens} exceeds the model's max_position_embeddings {limit}; pass at most {limit}")


def _calibration_bytes(job: Job) -> int:
    """Estimated size of the stored MoE inputs: one hidden vector per calibration token for every
    decoder layer past the leading dense ones."""
    config, s = job.adapter.config, job.settings
    hidden = getattr(config, "hidden_size", None) or 0
    layers = (getattr(config, "num_hidden_layers", None) or 0) - (getattr(config, "first_k_dense_replace", None) or 0)
    return s.samples * s.seq_len * int(hidden) * max(int(layers), 0) * job.dtype.itemsize


def _model_name(settings: Settings) -> str:
    return Path(settings.model.rstrip("/")).name


def _peak_rss_bytes() -> int:
    """This program's peak resident set size. Linux's VmHWM starts afresh at exec; ru_maxrss keeps the
    high-water mark of whatever process forked us (a benchmark holding a model, say)."""
    return proc_bytes("/proc/self/status", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(device: torch.device) -> dict:
    peak = {"cpu_rss_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        peak["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def progress_bar(enabled: bool):
    return progress_reporter(enabled, stderr)


def _calibration_tokens(settings: Settings, tokenizer, samples: int) -> tuple[torch.Tensor, dict]:
    """`samples` windows of the calibration text (a separate argument: export verifies on fewer)."""
    return sample_windows(tokenizer, parse_sources(settings.calibration), samples, settings.seq_len, settings.seed)


def read_paths(settings: Settings, model_dir: Path, *given: Path | None) -> tuple[Path, ...]:
    """What a run reads from disk, for `check_output` to keep the output away from: the model, the
    calibration text files, a stored calibration, and `given` (a plan, a threshold file)."""
    texts = [Path(spec.source) for spec in parse_sources(settings.calibration)]
    stored = [Path(settings.from_calibration)] if settings.from_calibration else []
    return tuple(p for p in (model_dir, *texts, *stored, *given) if p is not None and p.exists())


def _check_sources(settings: Settings) -> None:
    for spec in parse_sources(settings.calibration):
        check_source(spec.source)


def _open_model(job: Job):
    """(model, residency, router weights): with --stream the decoder layers stay on disk until used, one
    at a time, and the router weights for the fingerprint are read on their own."""
    if job.settings.stream:
        streamed = StreamedModel(job.model_dir, job.adapter, job.dtype)
        return streamed.model, streamed, streamed.router_weights()
    return load_weights(job.model_dir, job.dtype), None, None


def _activation_store(settings: Settings, device: torch.device) -> ActivationStore:
    device_bytes, cpu_bytes = default_budgets(device)
    if settings.activations_device_gb is not None:
        device_bytes = int(settings.activations_device_gb * 2**30)
    if settings.activations_cpu_gb is not None:
        cpu_bytes = int(settings.activations_cpu_gb * 2**30)
    return ActivationStore(device, device_bytes, cpu_bytes, settings.offload_dir)


@holding_outputs
def calibrate(settings: Settings, show_progress: bool) -> dict:
    _check_sources(settings)  # before the model is resolved: a hub alias may download it
    job = open_job(settings)
    check_length(job.adapter.config, settings.seq_len, "--seq-len")
    output = Path(settings.output or f"{_model_name(settings)}-calibration")
    check_output(output, "directory", settings.overwrite, inputs=read_paths(settings, job.model_dir))
    # The tokens before the disk check (the tokenizer alone, no weights): more samples than the text
    # holds is a usage error to name, not a full disk.
    token_ids, manifest = _calibration_tokens(settings, load_tokenizer(job.model_dir), settings.samples)
    check_free_space(output, _calibration_bytes(job))
    lock_output(output)
    writer = CalibrationWriter(output, settings.overwrite)
    start = time.perf_counter()
    model, residency, router_weights = _open_model(job)
    identity = model_identity(model, job.adapter, router_weights)
    fingerprint = {"tokens": manifest["token_ids_sha256"], "model": identity.router_sha256, "dtype": str(job.dtype)}
    resumed = writer.begin(fingerprint)  # an interrupted run's layers are kept; the rest is written now
    writer.add_tokens(token_ids)

    def store(step):
        writer.add_layer(step.index, step.inputs)
        return None

    with _activation_store(settings, job.device) as activations, progress_bar(show_progress) as progress:
        propagate(
            model,
            job.adapter,
            token_ids,
            store,
            batch_size=settings.batch_size,
            device=job.device,
            progress=progress,
            residency=residency,
            activations=activations,
        )
    manifest["model"] = {
        "source": settings.model,
        "model_type": identity.model_type,
        "num_experts": identity.num_experts,
        "router_sha256": identity.router_sha256,
    }
    path = writer.commit(manifest)
    return {
        "output": str(path),
        "resumed_layers": resumed,
        "manifest": manifest,
        "seconds": time.perf_counter() - start,
        "peak_memory": peak_memory_bytes(job.device),
    }


def _open_store(settings: Settings) -> CalibrationStore | None:
    """The stored calibration to reuse, or None (then the text sources are checked now, before loading)."""
    if settings.from_calibration:
        return CalibrationStore(Path(settings.from_calibration))
    _check_sources(settings)
    return None


def _tokens_from(
    store: CalibrationStore | None, job: Job, model, tokenizer, identity: ModelIdentity | None = None
) -> tuple[torch.Tensor, dict]:
    """Calibration tokens and their manifest (with its hash), from a stored calibration or sampled now."""
    if store is not None:
        identity = identity or model_identity(model, job.adapter)
        store.check_model(
            {
                "model_type": identity.model_type,
                "num_experts": identity.num_experts,
                "router_sha256": identity.router_sha256,
            }
        )
        token_ids = store.token_ids()
        manifest = {k: v for k, v in store.manifest.items() if k not in ("kind", "model")}
    else:
        token_ids, manifest = _calibration_tokens(job.settings, tokenizer, job.settings.samples)
    # A stored manifest comes back with its keys sorted; sort a fresh one too, so that a plan or a
    # threshold file has the same bytes whether its tokens were sampled now or read from `calibrate`.
    manifest = sorted_keys(manifest)
    manifest["sha256"] = manifest_sha256(manifest)
    return token_ids, manifest


def sorted_keys(value):
    """`value` with every mapping inside it in sorted key order (lists keep their order)."""
    if isinstance(value, dict):
        return {k: sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_keys(v) for v in value]
    return value


def _check_exportable(job: Job) -> None:
    """A quantized source the export cannot copy as is, or lacking a package, is refused now."""
    fmt = check_quantized_source(job.model_dir, job.adapter)
    if fmt is not None:
        fmt.check_requirements()


@holding_outputs
def prune(settings: Settings, show_progress: bool) -> dict:
    start = time.perf_counter()
    store = _open_store(settings)  # before the model is resolved: a hub alias may download it
    job = open_job(settings)
    with process_group(job.device):  # under torchrun; the ranks leave it together
        return _prune(job, store, show_progress, start)


def _prune(job: Job, store: CalibrationStore | None, show_progress: bool, start: float) -> dict:
    settings = job.settings
    keep = check_keep(job.adapter, settings.keep, must_prune=True)
    _check_recovery(job, store)
    output = _checked_prune_output(job, store, keep)
    if is_main():  # rank 0 writes the outputs (and the journal) for every process
        lock_output(output)
    model, residency, router_weights = _open_model(job)
    tokenizer = load_tokenizer(job.model_dir)
    identity = model_identity(model, job.adapter, router_weights)
    token_ids, manifest = _tokens_from(store, job, model, tokenizer, identity)
    loaded = time.perf_counter()
    fingerprint = search_fingerprint(settings, manifest, identity)
    journal = ProgressJournal(output.with_name(output.name + ".progress.json"), fingerprint)
    resumed = sorted(journal.layers)
    local_tokens = shard(token_ids)
    if len(local_tokens) == 0:
        raise UsageError(f"{len(token_ids)} calibration sequences cannot be shared by {world()[1]} processes")
    with (
        _activation_store(settings, job.device) as activations,
        progress_bar(show_progress and is_main()) as progress,
    ):
        plan, timings = plan_pruning(
            model,
            job.adapter,
            settings,
            local_tokens,
            manifest,
            device=job.device,
            store=store,
            progress=progress,
            journal=journal,
            residency=residency,
            identity=identity,
            activations=activations,
        )
    searched = time.perf_counter()
    result = {"model": settings.model, "keep": keep, "strategy": plan.strategy, "mode": plan.mode}
    if "recover" in plan.options:
        result["recover"] = plan.options["recover"]
    result["processes"] = world()[1]
    # The resolved settings (defaults, alias, YAML and flags merged), naming the path written, default or not.
    result["settings"] = {**settings.to_dict(), "output": str(output)}
    result.update(_write_pruned(job, output, plan, model, token_ids, journal))
    journal.finish()
    result["resumed_layers"] = resumed
    done = time.perf_counter()
    result["layers"] = _layer_rows(plan, timings)
    result["timings"] = _prune_timings(timings, start, loaded, searched, done)
    result["peak_memory"] = peak_memory_bytes(job.device)
    result["plan_sha256"] = plan.sha256()
    return result


def _checked_prune_output(job: Job, store: CalibrationStore | None, keep: int) -> Path:
    """Where prune writes (a plan file with --plan-only, else a checkpoint directory), checked before
    any weights load: the path, the free disk, the source's exportability and the sequence length."""
    settings = job.settings
    default_output = f"{_model_name(settings)}-keep{keep}" + (".plan.yaml" if settings.plan_only else "")
    output = Path(settings.output or default_output)
    inputs = read_paths(settings, job.model_dir)
    if settings.plan_only:
        check_output(output, "file", settings.overwrite, inputs=inputs)
    else:
        needed = estimated_output_bytes(job.model_dir, keep, job.adapter.num_experts)
        check_output(output, "directory", settings.overwrite, needed, inputs=inputs)
        _check_exportable(job)
    if store is None:
        check_length(job.adapter.config, settings.seq_len, "--seq-len")
    return output


def _write_pruned(job: Job, output: Path, plan: Plan, model, token_ids: torch.Tensor, journal: ProgressJournal) -> dict:
    """Rank 0 writes the plan (--plan-only) or the verified checkpoint; returns what the result says of it."""
    settings = job.settings
    if not is_main():  # rank 0 writes; the others end here with the same decisions
        return {"output": None, "plan": None}
    if settings.plan_only:
        plan.save(output, settings.overwrite)
        return {"plan": str(output), "output": None}
    try:
        provenance = export_checkpoint(
            job.model_dir,
            output,
            plan,
            job.adapter,
            model,
            token_ids[: settings.verify_samples],
            overwrite=settings.overwrite,
            streamed=settings.stream,
        )
    except VerificationFailed:
        journal.finish()  # its decisions may rest on the same wrong decode: a rerun must not resume them
        raise
    return {
        "output": str(output),
        "plan": str(output / PLAN_FILE),
        "verified_max_abs_logit_diff": provenance["verified_max_abs_logit_diff"],
        "config_changes": provenance["config_changes"],
    }


def _layer_rows(plan: Plan, timings: list[LayerTiming]) -> list[dict]:
    return [
        {
            "layer": lp.layer,
            "kept": lp.kept,
            "loss": lp.loss,
            "runner_up_loss": lp.runner_up_loss,
            "subsets_scored": lp.subsets_scored,
            "stats_seconds": t.stats_s,
            "search_seconds": t.search_s,
        }
        for lp, t in zip(plan.layers, timings)
    ]


def _prune_timings(timings: list[LayerTiming], start: float, loaded: float, searched: float, done: float) -> dict:
    """total = load + layer pass + write; the layer pass = the layers' stats + search (their sums) + the rest
    (loading each layer, running it forward to make the next layer's inputs, e2e reference passes)."""
    layer_pass = searched - loaded
    stats_s = sum(t.stats_s for t in timings)
    search_s = sum(t.search_s for t in timings)
    return {
        "load_and_calibration_tokens_s": loaded - start,
        "layer_pass_s": layer_pass,
        "layers_stats_s": stats_s,
        "layers_search_s": search_s,
        "layer_pass_other_s": layer_pass - stats_s - search_s,
        "write_s": done - searched,  # the export and its verification, or the plan file
        "total_s": done - start,
    }


def _plan_without_recovery(path: Path) -> Plan:
    """A plan to apply to the source model: one whose kept weights were re-fitted cannot be (they are not in it)."""
    plan = load_plan(path)
    if plan.options.get("recover"):
        raise UsageError(
            f"{path} was made with --recover: its re-fitted weights exist only in the checkpoint that prune run "
            "wrote; use that checkpoint (--model DIR), or make the plan without --recover"
        )
    return plan


def _check_recovery(job: Job, store: CalibrationStore | None) -> None:
    """--recover changes kept weights in memory and exports them: refuse what it cannot do, before any work."""
    settings, adapter = job.settings, job.adapter
    if not settings.recover:
        return
    sequences = len(store.token_ids()) if store is not None else settings.samples
    config = load_config(job.model_dir)
    reasons = {
        "plan_only": settings.plan_only and "--plan-only writes no weights; drop it to export the re-fitted model",
        "stream": settings.stream and "--stream does not hold the layers it would re-fit; run without --stream",
        "world": world()[1] > 1 and "torchrun: re-fitting is not shared out between processes yet; run one process",
        "batches": sequences <= settings.batch_size
        and f"it holds back whole calibration batches to check each change, so it needs more than one batch: "
        f"{sequences} sequences at --batch-size {settings.batch_size}; raise --samples or lower --batch-size",
        "refit": "refit" in settings.recover
        and not adapter.refittable
        and f"{adapter.config.model_type} computes its experts its own way; --recover router only",
        "merge": "merge" in settings.recover
        and not adapter.refittable
        and f"{adapter.config.model_type} computes its experts its own way, so their weights cannot be averaged; "
        "--recover router only",
        "quantized": getattr(config, "quantization_config", None) is not None
        and "the source is quantized (quantization_config in config.json); re-fitted weights would have to be "
        "re-quantized: prune it without --recover",
    }
    for reason in reasons.values():
        if reason:
            raise UsageError(f"--recover: {reason}")


def _check_thresholds(thresholds: SkipThresholds | None, model, adapter: MoEAdapter, kept: dict) -> None:
    """Thresholds (loaded before the model, so a malformed file fails fast) checked against the model
    as `kept` leaves it."""
    if thresholds is not None:
        thresholds.check_matches(model_fingerprint(model, adapter, kept), adapter.moe_layers(model))


@holding_outputs
def export(settings: Settings, plan_path: Path, thresholds_path: Path | None = None) -> dict:
    start = time.perf_counter()
    plan = _plan_without_recovery(plan_path)
    _check_sources(settings)
    job = open_job(settings)
    output = Path(settings.output or f"{_model_name(settings)}-keep{plan.uniform_keep() or 'mixed'}")
    needed = estimated_output_bytes(job.model_dir, plan.uniform_keep() or 0, job.adapter.num_experts)
    inputs = read_paths(settings, job.model_dir, plan_path, thresholds_path)
    check_output(output, "directory", settings.overwrite, needed, inputs=inputs)
    _check_exportable(job)
    lock_output(output)
    for lp in plan.layers:
        check_kept(job.adapter, lp.kept)
    thresholds = load_thresholds(thresholds_path) if thresholds_path else None
    model, tokenizer = load_model(job.model_dir, job.dtype)
    plan.check_matches(model_identity(model, job.adapter))
    _check_thresholds(thresholds, model, job.adapter, plan.kept())
    extra = {THRESHOLDS_FILE: thresholds.dumps("json")} if thresholds else None
    token_ids, _ = _calibration_tokens(settings, tokenizer, settings.verify_samples)
    provenance = export_checkpoint(
        job.model_dir, output, plan, job.adapter, model, token_ids, overwrite=settings.overwrite, extra_files=extra
    )
    return {
        "output": str(output),
        "plan": str(plan_path),
        "thresholds": str(output / THRESHOLDS_FILE) if thresholds else None,
        "seconds": time.perf_counter() - start,
        **provenance,
    }


def evaluate(
    settings: Settings,
    plan_path: Path | None,
    thresholds_path: Path | None = None,
    card: bool = False,
    show_progress: bool = False,
) -> dict:
    start = time.perf_counter()
    if not settings.perplexity and not settings.tasks:
        raise UsageError("--no-perplexity leaves nothing to measure; add --tasks or drop --no-perplexity")
    check_source(settings.eval_text)
    job = open_job(settings)
    check_length(job.adapter.config, settings.eval_window, "--window")
    if card:
        _check_card(settings, job, plan_path)
    plan = _plan_without_recovery(plan_path) if plan_path else None
    thresholds = load_thresholds(thresholds_path) if thresholds_path else None
    with _task_index(settings) as index:
        tokenizer = load_tokenizer(job.model_dir)
        stream = None  # the text as token ids, where perplexity is measured
        if settings.perplexity:  # the text's length checked before the model loads
            stream = token_stream(tokenizer, load_documents(settings.eval_text))
            check_scorable(stream, settings.eval_window, settings.eval_text)
        model = load_weights(job.model_dir, job.dtype)
        model.to(job.device)
        result = {
            "model": settings.model,
            "text": settings.eval_text,
            "device": str(job.device),
            "dtype": str(job.dtype).removeprefix("torch."),
            "plan": str(plan_path) if plan_path else None,
            "thresholds": str(thresholds_path) if thresholds_path else None,
        }
        kept = {}
        if plan is not None:
            plan.check_matches(model_identity(model, job.adapter))
            kept = plan.kept()
        _check_thresholds(thresholds, model, job.adapter, kept)

        # The same measurements, on the model as a plan and thresholds leave it (below).
        score = functools.partial(_scores, settings, model, tokenizer, stream, job.device, index, show_progress)
        if thresholds is None or kept:
            # A plan applied in memory runs through the reference router, skipping included.
            skip = {e.layer: (e.beta, thresholds.rule) for e in thresholds.layers} if thresholds else None
            tallies: dict[int, list[int]] = {}
            with job.adapter.pruned_view(model, kept, skip, tallies):
                result.update(score())
            if thresholds is not None:
                result["skip_fraction"] = {i: 1.0 - k / pairs for i, (k, pairs) in tallies.items() if pairs}
        else:
            with skipping(model, thresholds, job.adapter):
                result.update(score())
                result["skip_fraction"] = skip_fractions(model, job.adapter)
        result["seconds"] = time.perf_counter() - start
        result["peak_memory"] = peak_memory_bytes(job.device)
        if card:
            result["card"] = record_eval(job.model_dir, result)
        return result


def _check_card(settings: Settings, job: Job, plan_path: Path | None) -> None:
    """--card records the perplexity of an exported checkpoint as it is: refuse what it could not record."""
    if plan_path:
        raise UsageError("--card records results of the exported checkpoint itself; drop --plan (or --card)")
    if not settings.perplexity:
        raise UsageError("--card records the perplexity; drop --no-perplexity (or --card)")
    check_card_target(job.model_dir)


def _scores(
    settings: Settings, model, tokenizer, stream: torch.Tensor | None, device, index, show_progress: bool
) -> dict:
    """What eval measures on `model` as it stands: perplexity on `stream` (None: not asked for) and the
    lm-eval tasks."""
    scores = {}
    if stream is not None:
        with progress_bar(show_progress) as progress:
            task = progress.add_task("perplexity windows") if progress is not None else None
            scores = perplexity(
                model,
                stream,
                settings.eval_window,
                settings.eval_stride,
                device,
                on_window=(lambda: progress.advance(task)) if progress is not None else None,
            )
    if settings.tasks:
        scores["harness"] = _harness(settings, model, tokenizer, device, index)
    return scores


def _task_index(settings: Settings):
    """lm-eval's task index when --tasks asks for tasks (unknown names refused here), else nothing."""
    if not settings.tasks:
        return contextlib.nullcontext()
    from .harness import task_index

    return task_index(list(settings.tasks), [Path(d) for d in settings.task_dirs])


def _harness(settings: Settings, model, tokenizer, device: torch.device, index) -> dict:
    from .harness import run_tasks

    return run_tasks(
        model,
        tokenizer,
        list(settings.tasks),
        index,
        num_fewshot=settings.num_fewshot,
        limit=settings.task_limit,
        batch_size=settings.batch_size,
        device=str(device),
    )


@holding_outputs
def skip_profile(settings: Settings, plan_path: Path | None, show_progress: bool) -> dict:
    start = time.perf_counter()
    output = Path(settings.output or f"{_model_name(settings)}-thresholds.json")
    store = _open_store(settings)  # before the model is resolved: a hub alias may download it
    job = open_job(settings)
    check_output(output, "file", settings.overwrite, inputs=read_paths(settings, job.model_dir, plan_path))
    check_skipping_supported(job.adapter)
    rule = check_skip_rule(settings.skip_rule or default_skip_rule(job.adapter.top_k), job.adapter.top_k)
    if store is None:
        check_length(job.adapter.config, settings.seq_len, "--seq-len")
    plan = _plan_without_recovery(plan_path) if plan_path else None
    lock_output(output)
    model, tokenizer = load_model(job.model_dir, job.dtype)
    kept = {}
    if plan is not None:
        plan.check_matches(model_identity(model, job.adapter))
        kept = plan.kept()
    token_ids, manifest = _tokens_from(store, job, model, tokenizer)
    with progress_bar(show_progress) as progress:
        weights = routing_weights(
            model,
            job.adapter,
            token_ids,
            batch_size=settings.batch_size,
            device=job.device,
            kept=kept,
            progress=progress,
        )
    statistic = settings.skip_statistic()
    rule, layers = profile(weights, rule, statistic, job.adapter.top_k)
    thresholds = SkipThresholds(
        model=model_fingerprint(model, job.adapter, kept),
        rule=rule,
        statistic=statistic,
        layers=layers,
        calibration=manifest,
    )
    thresholds.save(output, settings.overwrite)
    return {
        "output": str(output),
        "model": settings.model,
        "plan": str(plan_path) if plan_path else None,
        "rule": rule,
        "statistic": statistic,
        "layers": [{"layer": e.layer, "beta": e.beta, "skip_fraction": e.skip_fraction} for e in layers],
        "skip_fraction": sum(e.skip_fraction for e in layers) / len(layers),
        "seconds": time.perf_counter() - start,
    }


@holding_outputs
def compare(settings: Settings, specs: list[str], report_dir: Path | None, show_progress: bool) -> dict:
    if len(specs) < 2:
        raise UsageError("eval --compare needs at least two variants, e.g. tiny tiny-keep6 tiny-keep6+skip")
    check_source(settings.eval_text)
    variants = [cmp.parse_variant(spec) for spec in specs]
    for config in {v.model_dir: load_config(v.model_dir) for v in variants}.values():  # before any loads
        check_length(config, settings.eval_window, "--window")
        check_length(config, settings.prompt_len + settings.new_tokens, "--prompt-len plus --new-tokens")
    if report_dir is not None:  # an existing report directory is written into again
        from .report import pyplot

        pyplot()  # without matplotlib, refuse now rather than after the measuring
        read = [v.model_dir for v in variants] + [v.thresholds_path for v in variants if v.thresholds_path]
        check_output(report_dir, "directory", overwrite=True, flag="--report", inputs=(*read, Path(settings.eval_text)))
        lock_output(report_dir)
    with _task_index(settings) as index:
        return _compare(settings, variants, report_dir, show_progress, index)


def _compare(settings: Settings, variants, report_dir: Path | None, show_progress: bool, index) -> dict:
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    tokenizers = [cmp.load_variant(v, dtype, device) for v in variants]
    cmp.check_one_tokenizer(tokenizers)
    stream = token_stream(tokenizers[0], load_documents(settings.eval_text))
    check_scorable(stream, settings.eval_window, settings.eval_text)
    needed = max(settings.speed_batch) * settings.prompt_len
    if len(stream) < needed:
        raise UsageError(f"{settings.eval_text} holds {len(stream)} tokens, fewer than the {needed} the prompts need")
    with progress_bar(show_progress) as progress:
        harness = None
        if settings.tasks:

            def harness(model):
                return _harness(settings, model, tokenizers[0], device, index)

        cmp.measure_quality(variants, stream, settings.eval_window, settings.eval_stride, device, progress, harness)
        noise = _measure_speeds(settings, variants, stream, device, progress)
    result = {
        "setup": _compare_setup(settings, device, dtype),
        # How settled each batch size's timings are; noisy: some speed-up is not known within the tolerance.
        "noise": noise,
        "noisy": any(n["noisy"] for n in noise.values()),
        "variants": [{**cmp.describe(v), **v.results} for v in variants],
        "peak_memory": peak_memory_bytes(device),
    }
    if result["noisy"]:
        stderr.print(
            "warning: these speed-ups are noisy (see `noise` in the JSON): measure on an idle machine, "
            "or give more rounds time with --time-budget"
        )
    if report_dir is not None:
        from .report import write_report

        with writing(report_dir):
            result["report"] = write_report(result, Path(report_dir))
    return result


def _measure_speeds(settings: Settings, variants, stream: torch.Tensor, device, progress) -> dict:
    """Prefill and decode speed of every variant at each batch size (prompts cut from the text's start),
    into each variant's results (the first batch size also as its headline); returns the noise record
    per batch size and prints its warnings on stderr whatever the output format."""
    rounds = cmp.Rounds(minimum=settings.repeats, budget_s=settings.speed_budget_s)
    noise = {}
    for i, batch in enumerate(settings.speed_batch):
        prompt = stream[: batch * settings.prompt_len].reshape(batch, settings.prompt_len)
        measured, noise[str(batch)] = cmp.measure_speed(variants, prompt, settings.new_tokens, rounds, device, progress)
        for warning in noise[str(batch)]["warnings"]:
            stderr.print(f"warning: batch {batch}: {warning}")
        for v in variants:
            v.results.setdefault("speed", {})[str(batch)] = measured[v.spec]
            if i == 0:  # the first batch size is the headline (table, charts)
                v.results.update(measured[v.spec])
    return noise


def _compare_setup(settings: Settings, device: torch.device, dtype: torch.dtype) -> dict:
    """How the comparison was measured, as its table title and report state it."""
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "text": settings.eval_text,
        "window": settings.eval_window,
        "stride": settings.eval_stride,
        "batch": settings.speed_batch[0],
        "batches": settings.speed_batch,
        "prompt_len": settings.prompt_len,
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "speed_budget_s": settings.speed_budget_s,
        "threads": torch.get_num_threads(),
    }
