"""Where layer-by-layer propagation keeps its activations.

On the compute device while a generation (one layer's outputs and MoE-block
inputs) fits `device_bytes`, then in CPU memory up to `cpu_bytes`, then in
memory-mapped files under `directory`. Consumers move what they read to the
compute device chunk by chunk. Two generations are alive at a time (a layer's
inputs and its outputs). Defaults: 40 % of the free memory of each.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from ..outputs import owner_gone
from ..system import proc_bytes

_SPILL = "moe-sparsify-activations-"


def _available_cpu_bytes() -> int:
    return proc_bytes("/proc/meminfo", "MemAvailable") or 8 * 2**30  # a guess where /proc is missing


def default_budgets(device: torch.device) -> tuple[int, int]:
    cpu = int(0.4 * _available_cpu_bytes())
    if device.type == "cuda":
        return int(0.4 * torch.cuda.mem_get_info(device)[0]), cpu
    return cpu, cpu  # on CPU the "device" is CPU memory already


def _host_prefix() -> str:
    """The host and then the PID in a spill directory's name tell a killed run's directory from a live
    one: another run's, or one on another machine sharing --offload-dir."""
    return f"{_SPILL}{socket.gethostname()}-"


def remove_stale_spills(parent: Path) -> list[Path]:
    """Spill directories of runs killed on this host (SIGKILL, the OOM killer): no `finally` ran for them,
    and they can hold gigabytes. Returns what went."""
    prefix, removed = _host_prefix(), []
    for candidate in Path(parent).glob(f"{glob.escape(prefix)}*"):
        pid = candidate.name[len(prefix) :].partition("-")[0]
        if owner_gone(pid):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


class ActivationStore:
    def __init__(self, device: torch.device, device_bytes: int, cpu_bytes: int, directory: str | None = None):
        self.device, self.device_bytes, self.cpu_bytes = device, device_bytes, cpu_bytes
        remove_stale_spills(Path(directory or tempfile.gettempdir()))
        self._dir = tempfile.TemporaryDirectory(prefix=f"{_host_prefix()}{os.getpid()}-", dir=directory)
        self._files = 0
        self.placed = {"device": 0, "cpu": 0, "disk": 0}  # bytes of the current generation
        self.peak = dict(self.placed)

    def new_generation(self) -> None:
        self.placed = dict.fromkeys(self.placed, 0)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        if self.placed["device"] + size <= self.device_bytes:
            where, out = "device", tensor.to(self.device)
        elif self.device.type != "cpu" and self.placed["cpu"] + size <= self.cpu_bytes:
            where, out = "cpu", tensor.to("cpu")
        else:
            path = Path(self._dir.name) / f"{self._files}.pt"
            self._files += 1
            torch.save(tensor.detach().cpu().contiguous(), path)
            where, out = "disk", torch.load(path, mmap=True, weights_only=True)
            path.unlink()  # the mapping keeps the data until the tensor is freed
        self.placed[where] += size
        self.peak[where] = max(self.peak[where], self.placed[where])
        return out

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # the spilled files go whether the run ends or fails
