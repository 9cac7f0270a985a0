"""Model aliases, local directories and hub ids -> a loaded model and tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from .adapters import adapter_for
from .aliases import model_aliases
from .errors import FailedRun, MoeSparsifyError, UsageError, first_line
from .model_config import auto_model_class, load_config
from .quant import detect
from .streaming import StreamedModel

BUNDLED_PREFIX = "bundled:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_model_dir(name: str) -> Path:
    return Path(str(resources.files("moe_sparsify") / "assets" / name))


def resolve_model_dir(spec: str) -> Path:
    """A local directory holding config.json and safetensors weights."""
    aliases = model_aliases()
    target = str(aliases[spec]["path"]) if spec in aliases else spec
    if target.startswith(BUNDLED_PREFIX):
        return bundled_model_dir(target[len(BUNDLED_PREFIX) :])
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; pass a directory written by save_pretrained")
        return path
    if path.exists() or target.startswith((".", "/", "~")) or target.count("/") != 1:
        raise UsageError(
            f"model {spec!r} is not an alias ({', '.join(sorted(aliases))}), a model directory, or a hub id (org/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(target, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise FailedRun(
            f"could not fetch {target!r} from the hub ({type(exc).__name__}); download it and pass the local directory"
        ) from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {name}: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}; pick one")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_decoded(model_dir: Path, dtype: torch.dtype, reference_decode: bool = False):
    """A quantized checkpoint as the float model its config describes, every weight decoded by our
    reader (the same tensors `--stream` reads), not by transformers' quantizer: that one infers the
    block size from shapes, wrong for partial edge blocks."""
    label = detect(model_dir).label
    adapter = adapter_for(load_config(model_dir))
    if adapter.config_section or not adapter.streamable:
        raise UsageError(
            f"{label} checkpoints of {adapter.config.model_type} are not supported: its loader converts tensors "
            "beyond renaming them; pass the float checkpoint"
        )
    return StreamedModel(model_dir, adapter, dtype, reference_decode).load_all()


@contextmanager
def _quiet_loading(report: list[str]) -> Iterator[None]:
    """One transformers load without its weight-loading bar and with its log (the LOAD REPORT: a table
    of missing, mismatched and unconvertible tensors, tracebacks included) collected into `report`
    instead of printed: errors are one line, and that line quotes the report's own error. Both
    switches are process-wide and go back as the caller had them."""
    import logging

    from transformers.utils import logging as hf_logging

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            report.extend(record.getMessage().splitlines())

    root = hf_logging.get_logger("transformers")
    handlers, collect, level = list(root.handlers), Collect(), root.level
    root.setLevel(logging.WARNING)  # the report is a warning: collect it whatever the verbosity (nothing prints)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(collect)
    try:
        yield
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
        for handler in handlers:
            root.addHandler(handler)
        if was_enabled:
            hf_logging.enable_progress_bar()


_REPORTED_ERROR = re.compile(r"^\s*(?:\w+Error|Error): ")
# A row of the report's table: `KEY | STATUS | detail`.
_REPORTED_ROW = re.compile(
    r"^\s*(?P<key>[^|]+?)\s*\|\s*(?P<status>MISSING|MISMATCH|CONVERSION)\s*\|\s*(?P<detail>.*?)\s*$"
)


def _reported_error(report: list[str], exc: BaseException) -> str:
    """What the load report says is wrong: its first rows naming a tensor (`...down_proj MISMATCH: ckpt
    torch.Size([7, ...]) vs model ...`) and its own error line (`RuntimeError: stack expects ...`); the
    exception itself only points at the report."""
    rows = [m for line in report if (m := _REPORTED_ROW.match(line))]
    found = [f"{m['key']} {m['status']}" + (f": {m['detail']}" if m["detail"] else "") for m in rows[:2]]
    found += [line.strip() for line in report if _REPORTED_ERROR.match(line)][:1]
    return "; ".join(dict.fromkeys(found)) if found else first_line(exc)


def load_model(model_dir: Path, dtype: torch.dtype):
    """(model, tokenizer): `load_weights` and `load_tokenizer`."""
    return load_weights(model_dir, dtype), load_tokenizer(model_dir)


def load_weights(model_dir: Path, dtype: torch.dtype):
    """The model, weights on the CPU; callers move what they compute with. Quantized checkpoints come decoded."""
    if detect(model_dir) is not None:
        return load_decoded(model_dir, dtype)
    report: list[str] = []
    try:
        model, info = load_pretrained(model_dir, dtype, report, output_loading_info=True)
    except MoeSparsifyError:
        raise
    except Exception as exc:  # safetensors, OSError and transformers' own errors all mean "unreadable"
        raise FailedRun(
            f"cannot load the weights in {model_dir}: {_reported_error(report, exc)}; re-save or re-download "
            "the checkpoint"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers fills them with random numbers: every result would be silently wrong
        raise FailedRun(
            f"the checkpoint in {model_dir} lacks {len(missing)} weight(s) the model needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); re-save or re-download the checkpoint"
        )
    return model


def load_pretrained(model_dir: Path, dtype: torch.dtype, report: list[str] | None = None, **kwargs):
    """Stock transformers' load of a checkpoint, in eval mode, under `load_config`'s flags; its log goes
    into `report` (see `_quiet_loading`). With output_loading_info=True: (model, loading info)."""
    config = load_config(model_dir)
    with _quiet_loading([] if report is None else report):  # every load, the export's verification reload too
        loaded = auto_model_class(config).from_pretrained(model_dir, config=config, dtype=dtype, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.eval()
    return loaded


# What a tokenizer is made from (fast, sentencepiece, BPE vocab + merges, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        if Path(model_dir).is_dir() and not any(any(Path(model_dir).glob(p)) for p in TOKENIZER_FILES):
            raise UsageError(
                f"{model_dir} holds no tokenizer (tokenizer.json, tokenizer.model or vocab files); copy the "
                "tokenizer files of the model it came from into it"
            ) from None
        raise FailedRun(
            f"cannot load the tokenizer in {model_dir}: {first_line(exc)}; copy good tokenizer files (tokenizer.json, "
            "tokenizer_config.json) of the model it came from into it"
        ) from None
