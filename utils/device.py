"""The one place for device logic: choosing the device, synchronising, peak memory, device facts.

No other module calls ``torch.cuda``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)


def get_device(gpu: int | None = 0, use_tpu: bool = False) -> torch.device:
    """CUDA device ``gpu`` when CUDA is present, else the CPU (with a warning)."""
    if use_tpu:
        raise NotImplementedError("use_tpu=true (torch_xla) is not implemented yet; run with use_tpu=false")
    if torch.cuda.is_available():
        if gpu is None or gpu < 0:
            return torch.device("cpu")
        if gpu >= torch.cuda.device_count():
            raise ValueError(f"gpu={gpu} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(gpu)
        return torch.device("cuda", gpu)
    if gpu is not None and gpu >= 0:
        log.warning("CUDA is not available: running on the CPU (slow for real models)")
    return torch.device("cpu")


def to_host(t: torch.Tensor) -> list:
    """Copy a tensor to the host as nested lists: the loop's one synchronisation point per level."""
    with allow_sync():
        return t.detach().cpu().tolist()


def index_tensor(indices: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of indices on ``device``: a host-to-device copy, used only off the per-level path
    (after a particle stops, and once at the end of sampling)."""
    with allow_sync():
        return torch.tensor(indices, dtype=torch.long, device=device)


@contextlib.contextmanager
def allow_sync() -> Iterator[None]:
    """Suspend CUDA's sync debug mode (set by tests to catch hidden synchronisations) inside the block."""
    if not torch.cuda.is_available():
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def forbid_sync() -> Iterator[None]:
    """Raise on any CUDA host synchronisation inside the block (except inside :func:`allow_sync`)."""
    if not torch.cuda.is_available():
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak allocated bytes since the last reset, or why it is unavailable."""
    if device.type == "cuda":
        return {"available": True, "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"available": False, "reason": f"peak memory is not tracked on {device.type}"}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name and library versions, for metrics.json."""
    info: dict[str, Any] = {"type": device.type, "python": platform.python_version(),
                            "versions": {p: _version(p) for p in ("torch", "torchvision", "diffusers", "piq", "lpips",
                                                                  "hydra-core", "numpy")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info
