"""The one place for device logic: choosing the device (CUDA, CPU, XLA), synchronising, peak memory,
device facts, and the process group of a multi-process (torchrun) run.

No other module calls ``torch.cuda``, ``torch_xla`` or ``torch.distributed``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)


@dataclass
class Dist:
    """Rank and world size of this process (1 process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _uses_cuda(gpu: int | None, use_tpu: bool) -> bool:
    return not use_tpu and gpu is not None and gpu >= 0 and torch.cuda.is_available()


def init_distributed(gpu: int | None = 0, use_tpu: bool = False) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if _uses_cuda(gpu, use_tpu) else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a list in rank order)."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def shutdown(d: Dist) -> None:
    """Leave the process group together: a rank that tore down its gloo connections while another still
    wrote results ended, now and then, in std::terminate ('terminate called without an active exception')."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def xla_device() -> torch.device:
    try:
        import torch_xla
    except ImportError as err:
        raise NotImplementedError("use_tpu=true needs torch_xla (torch 2.9.0 + torch_xla 2.9.0): build that "
                                  "environment with `make test-xla` or pip install -r requirements-tpu.txt") from err
    return torch_xla.device()


def get_device(gpu: int | None = 0, use_tpu: bool = False, dist: Dist | None = None) -> torch.device:
    """The XLA device (use_tpu), CUDA device ``gpu`` (the local rank under torchrun), else the CPU (with a warning)."""
    if use_tpu:
        return xla_device()
    if not _uses_cuda(gpu, use_tpu):
        if gpu is not None and gpu >= 0:
            log.warning("CUDA is not available: running on the CPU (slow for real models)")
        return torch.device("cpu")
    if dist is not None and dist.world > 1:
        gpu = dist.local_rank
    if gpu >= torch.cuda.device_count():
        raise ValueError(f"gpu={gpu} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def auto_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU (for scripts with ``device: auto``)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager_device(device: torch.device) -> torch.device:
    """``device``, or the CPU in place of XLA, for the work that stays out of lazy graphs: random generators
    (XLA has none per particle; their draws are transferred and enter graphs as data, so nothing recompiles)
    and scoring images (piq / lpips would compile graphs)."""
    return torch.device("cpu") if device.type == "xla" else device


def to_host(t: torch.Tensor) -> list:
    """Copy a tensor to the host as nested lists: the loop's one synchronisation point per level.
    On XLA the copy runs the pending graph that computes ``t`` (and only that)."""
    with allow_sync():
        return t.detach().cpu().tolist()


def end_step(*carry: torch.Tensor | None) -> None:
    """Mark the end of one iteration of a loop that repeats one computation (an MCMC step, an ODE step).

    On XLA this cuts the lazy graph at ``carry``, the tensors the next iteration reads: their graph is
    dispatched without waiting (torch_xla's ``_xla_sync_multi``), so the iteration compiles once and every
    later iteration, level and image reuses it; without the cut a level's ``num_steps`` iterations unroll
    into one graph whose compile time and memory grow with ``num_steps``. The cut names its tensors rather
    than cutting at every live tensor (``torch_xla.sync()``): after a backward, the autograd engine's XLA
    worker thread can still hold a gradient buffer for a moment, and a global cut then compiles, at random,
    a variant of the step graph with that buffer as one more output. None entries (a loss the step skipped) are
    left out. Elsewhere a no-op."""
    if carry[0].device.type == "xla":
        import torch_xla

        torch_xla._XLAC._xla_sync_multi([t for t in carry if t is not None], devices=[], wait=False)


@lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by ``torch.compile`` with dynamic sizes, once per process and function: its elementwise work
    becomes one kernel (or a few around the library calls it makes, such as FFTs), and another float argument does not
    compile it again (dynamo does not specialise floats), nor does another batch size, except after a first call
    whose batch was 1 or equal to another of its inputs' sizes (dynamo then specialises it, or takes the two for one
    size): that function compiles once more."""
    return torch.compile(fn, dynamic=True)


def fused(fn: Callable, device: torch.device) -> Callable:
    """The arithmetic ``fn`` as the device should run it: on CUDA :func:`compiled` and called without autograd (one
    grad mode, so one trace, whatever the caller's; these functions compute a sampler's new state, which nothing
    differentiates); elsewhere ``fn`` itself: on the CPU a compile costs the demo and the tests more than it saves,
    and torch_xla compiles its own graphs."""
    if device.type != "cuda":
        return fn
    run = compiled(fn)

    def without_grad(*args: Any) -> Any:
        with torch.no_grad():
            return run(*args)
    return without_grad


def index_tensor(indices: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of indices on ``device``: a host-to-device copy, used only off the per-level path
    (after a particle stops, and once at the end of sampling)."""
    with allow_sync():
        return torch.tensor(indices, dtype=torch.long, device=device)


@contextlib.contextmanager
def launch_on(device: torch.device) -> Iterator[None]:
    """Make ``device`` the current CUDA device for launches that go to the current one (a Triton kernel's); a no-op
    for other devices (the CPU tensors of Triton's interpreter in the tests)."""
    with torch.cuda.device(device if device.type == "cuda" else -1):
        yield


@contextlib.contextmanager
def allow_sync() -> Iterator[None]:
    """Suspend CUDA's sync debug mode (set by tests to catch hidden synchronisations) inside the block."""
    if not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0:
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
    """Wait for the device: CUDA synchronize; on XLA, run the graph of every live tensor and wait for it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla

        torch_xla.sync(wait=True)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak allocated bytes since the last reset, or why it is unavailable.

    On XLA the runtime's memory info gives the peak since the process started where it exists (TPU: it is
    not reset at phase boundaries); PJRT CPU has none, which is reported as unavailable."""
    if device.type == "cuda":
        return {"available": True, "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(device)
        except RuntimeError as err:
            return {"available": False, "reason": f"XLA memory info unavailable on this runtime: {err}"[:300]}
        peak = info.get("peak_bytes_used", info.get("bytes_used"))
        if peak is None:
            return {"available": False, "reason": f"XLA memory info has no usage fields: {sorted(info)}"}
        return {"available": True, "peak_bytes": int(peak), "since": "process start"}
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
    elif device.type == "xla":
        import torch_xla.runtime as xr

        info.update(name=f"XLA {xr.device_type()}", torch_xla=_version("torch_xla"))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info
