"""Named calibration sets, each pinned to a hub dataset, its files or configs, and a split.

`c4` is the paper's general-purpose calibration (Lu et al. 2024: the first shard of C4's English
train split); `math` its task-specific one for GSM8K (the MATH train set, each record's problem and
solution joined by a space, as the paper's code builds it). Documents are shuffled with the paper's
seed 42 and the first `documents` kept: enough text for the default 128 x 2048 tokens many times
over, without tokenising a 356,000-document shard. The run's own --seed then draws the windows.

Read through `datasets` (a download on first use, then its cache), so offline they fail in one line
that names the way out: --calibration FILE.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from ..errors import FailedRun, UsageError

SHUFFLE_SEED = 42  # the paper's code shuffles its calibration documents with this seed


@dataclass(frozen=True)
class Preset:
    repo: str
    split: str
    fields: tuple[str, ...]  # joined with a space into one document
    data_files: str | None = None  # a file inside the repo, where one shard is meant
    configs: tuple[str | None, ...] = (None,)  # concatenated in this order
    documents: int | None = None  # None: all

    def describe(self) -> str:
        where = self.data_files or ",".join(c for c in self.configs if c) or "default"
        kept = f"first {self.documents} documents" if self.documents else "all documents"
        return f"hub dataset {self.repo} ({where}), split {self.split}, shuffled (seed {SHUFFLE_SEED}), {kept}"


PRESETS: dict[str, Preset] = {
    "c4": Preset("allenai/c4", "train", ("text",), data_files="en/c4-train.00000-of-01024.json.gz", documents=16384),
    "math": Preset(
        "EleutherAI/hendrycks_math",
        "train",
        ("problem", "solution"),
        configs=(
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
    ),
    "code": Preset(
        "codeparrot/codeparrot-clean-valid",
        "train",
        ("content",),
        data_files="file-000000000054.json.gz",
        documents=16384,
    ),
}


def is_preset(source: str) -> bool:
    return source in PRESETS


@contextmanager
def _quiet_hub(datasets):
    """Hub logs at ERROR and `datasets`' progress bars off for one load, then back as the caller had
    them: both switches are process-wide."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets", "fsspec")]
    levels = [logger.level for logger in loggers]
    bars_were_on = not datasets.are_progress_bars_disabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def preset_documents(name: str) -> tuple[str, ...]:
    return _documents(name, PRESETS[name])


@lru_cache(maxsize=4)  # the pre-flight check and the sampling both read them
def _documents(name: str, preset: Preset) -> tuple[str, ...]:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"calibration preset {name!r} is read through `datasets`; pip install datasets, or pass --calibration FILE"
        ) from None
    try:
        with _quiet_hub(datasets):  # offline, every retry would log a warning: the error below says it once
            parts = [
                datasets.load_dataset(preset.repo, config, data_files=preset.data_files, split=preset.split)
                for config in preset.configs
            ]
    except Exception as exc:  # offline, gated, renamed: the hub raises many types, all mean "not readable"
        raise FailedRun(
            f"calibration preset {name!r} ({preset.repo}) could not be read ({type(exc).__name__}); offline, pass "
            "--calibration FILE (a local .txt, .jsonl, .json, .json.gz or .parquet file, e.g. that data downloaded "
            "elsewhere)"
        ) from None
    data = datasets.concatenate_datasets(parts).shuffle(seed=SHUFFLE_SEED)
    if preset.documents is not None:
        data = data.select(range(min(preset.documents, len(data))))
    missing = [f for f in preset.fields if f not in data.column_names]
    if missing:
        raise FailedRun(f"calibration preset {name!r}: the dataset has no field {missing[0]!r}; report this")
    columns = [data[f] for f in preset.fields]
    return tuple(" ".join(str(v) for v in values) for values in zip(*columns))
