"""A calibration on disk: token windows, manifest, and every MoE block's inputs.

    DIR/manifest.json          sources, counts, seed, sha256 of the token ids, model identity
    DIR/tokens.safetensors     token_ids (samples x seq_len)
    DIR/layer_XXX.safetensors  moe_input (tokens x hidden), one file per MoE layer

Several `prune` runs (keep values, strategies) reuse one calibration in
layer-wise mode; progressive mode re-runs the layers from the stored tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import FailedRun, UsageError, first_line, stop_if_asked_after
from ..files import save_tensors
from ..outputs import move_into_place, replacing, writing

KIND = "moe-sparsify-calibration"
MANIFEST = "manifest.json"


def manifest_sha256(manifest: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class CalibrationWriter:
    """Writes into a hidden DIR.partial and renames it on `commit()`, so the output appears whole or not
    at all. The partial directory is also the resume state: a rerun whose fingerprint (tokens, model,
    dtype) matches keeps the layers already written. Test hook: MOE_SPARSIFY_STOP_AFTER_LAYER=k."""

    PROGRESS = "progress.json"

    def __init__(self, directory: Path, overwrite: bool):
        self.final = Path(directory)
        if self.final.exists() and not overwrite:
            raise UsageError(f"{self.final} exists; pass --overwrite or choose another --output")
        self.tmp = self.final.with_name(f".{self.final.name}.partial")

    def begin(self, fingerprint: dict) -> list[int]:
        """Start, or resume a run with the same fingerprint; returns the layers already written.
        An interrupted run with another fingerprint is refused rather than silently discarded."""
        progress = self.tmp / self.PROGRESS
        if progress.exists():
            try:
                left = json.loads(progress.read_text())
            except ValueError:
                left = None
            if left == fingerprint:
                for stale in self.tmp.glob(".*.partial-*"):  # a layer file a killed run was writing
                    stale.unlink()
                return sorted(int(p.stem.split("_")[1]) for p in self.tmp.glob("layer_*.safetensors"))
            raise UsageError(
                f"{self.tmp} was left by an interrupted calibration with other tokens, model or dtype; rerun "
                "with the same arguments to resume, or delete it to start over"
            )
        shutil.rmtree(self.tmp, ignore_errors=True)
        with writing(self.final):
            self.tmp.mkdir()
            progress.write_text(json.dumps(fingerprint, sort_keys=True))
        return []

    def add_tokens(self, token_ids: torch.Tensor) -> None:
        with writing(self.final):
            save_tensors({"token_ids": token_ids.contiguous()}, self.tmp / "tokens.safetensors")

    def add_layer(self, index: int, inputs: list[torch.Tensor]) -> None:
        path = self.tmp / f"layer_{index:03d}.safetensors"
        if not path.exists():
            tensor = torch.cat([x.detach().cpu() for x in inputs]).contiguous()
            with replacing(path) as partial, writing(self.final):
                save_tensors({"moe_input": tensor}, partial)
        stop_if_asked_after(index)

    def commit(self, manifest: dict) -> Path:
        with writing(self.final):
            (self.tmp / self.PROGRESS).unlink(missing_ok=True)
            (self.tmp / MANIFEST).write_text(json.dumps({"kind": KIND, **manifest}, indent=2, sort_keys=True) + "\n")
            move_into_place(self.tmp, self.final)
        return self.final


class CalibrationStore:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError(
                f"{self.dir} is not a calibration directory (no readable {MANIFEST}); "
                "run `moe-sparsify calibrate` first"
            ) from None
        if self.manifest.get("kind") != KIND:
            raise UsageError(f"{path} is not a moe-sparsify calibration manifest")

    def _damaged(self, name: str, exc: BaseException) -> FailedRun:
        return FailedRun(f"cannot read {self.dir / name} ({first_line(exc)}); run `moe-sparsify calibrate` again")

    def _read(self, name: str, key: str) -> torch.Tensor:
        try:
            return load_file(self.dir / name)[key]
        except Exception as exc:  # a missing or damaged file: OSError, SafetensorError, KeyError
            raise self._damaged(name, exc) from None

    def _layer_file(self, index: int) -> str:
        name = f"layer_{index:03d}.safetensors"
        if not (self.dir / name).exists():
            raise FailedRun(
                f"calibration {self.dir} has no inputs for layer {index}; run `moe-sparsify calibrate` again"
            )
        return name

    def token_ids(self) -> torch.Tensor:
        return self._read("tokens.safetensors", "token_ids")

    def layer_inputs(self, index: int) -> torch.Tensor:
        return self._read(self._layer_file(index), "moe_input")

    def check_layers(self, layers: list[int]) -> None:
        """Every layer's file is there and its header names its tensor, checked before any layer is
        searched (headers only): a damaged store then fails before there is work to journal."""
        for name in map(self._layer_file, layers):
            try:
                with safe_open(self.dir / name, "pt") as header:
                    if "moe_input" not in header.keys():
                        raise KeyError("no tensor 'moe_input'")
            except Exception as exc:  # as in _read
                raise self._damaged(name, exc) from None

    def check_model(self, identity: dict) -> None:
        stored = self.manifest.get("model", {})
        diffs = [f"{k}: {stored.get(k)!r} != {v!r}" for k, v in identity.items() if stored.get(k) != v]
        if diffs:
            raise UsageError(f"calibration {self.dir} was made for another model ({'; '.join(diffs)}); recalibrate")
