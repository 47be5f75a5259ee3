"""The device abstraction of the profiler: clocks, memory, backend and topology facts, CPU or GPU.

Owns: picking the torch device and the process-group backend (nccl on GPU, gloo on CPU), the
timer (CUDA events on GPU, a synchronised `time.perf_counter` on CPU), peak-memory counters,
device names and memory sizes, and the topology facts (`nvidia-smi topo -m`, NVML NVLink
counts) that are recorded when available and never required.
Does not own: what is timed (compute.py, links.py) or how processes start (workers.py).

Every CUDA-only path of the profiler lives in this file, so the rest runs unchanged on CPU.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from planner.errors import SpecError
from planner.specs import DeviceKind, Dtype

# `nvidia-smi topo -m` normally answers in well under a second; a hung driver must not hang us.
NVIDIA_SMI_TIMEOUT_S = 10.0

TORCH_DTYPES = {Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16}


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """What one worker runs on: the torch device, its name and memory, the backend."""

    kind: DeviceKind
    torch_device: str
    name: str
    memory_bytes: int
    backend: str


def parse_device_kind(value: str) -> DeviceKind:
    """`cpu` or `cuda` (the CLI's spelling) -> DeviceKind; `gpu` is accepted as an alias."""
    spelled = {"cpu": DeviceKind.CPU, "cuda": DeviceKind.GPU, "gpu": DeviceKind.GPU}
    if value not in spelled:
        raise SpecError(f"--device {value!r} is not allowed; use one of cpu|cuda")
    return spelled[value]


def check_available(kind: DeviceKind, nproc_per_node: int) -> None:
    """Raise SpecError when the requested devices are not here."""
    if kind is DeviceKind.GPU:
        if not torch.cuda.is_available():
            raise SpecError("--device cuda: no CUDA device is visible; use --device cpu")
        count = torch.cuda.device_count()
        if nproc_per_node > count:
            raise SpecError(f"--nproc {nproc_per_node} exceeds the {count} visible CUDA devices")
        if not torch.distributed.is_nccl_available():
            raise SpecError("--device cuda needs the nccl backend, which this torch lacks")
    elif not torch.distributed.is_gloo_available():
        raise SpecError("--device cpu needs the gloo backend, which this torch lacks")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_info(kind: DeviceKind, local_rank: int, local_world_size: int) -> DeviceInfo:
    """The device a worker with this local rank uses.

    A CPU worker is one process; its memory is the host's divided among the local workers, since
    that is what each of them can hold at once.
    """
    if kind is DeviceKind.GPU:
        props = torch.cuda.get_device_properties(local_rank)
        return DeviceInfo(
            kind=kind,
            torch_device=f"cuda:{local_rank}",
            name=props.name,
            memory_bytes=int(props.total_memory),
            backend="nccl",
        )
    return DeviceInfo(
        kind=kind,
        torch_device="cpu",
        name=f"cpu ({cpu_name()})",
        memory_bytes=host_memory_bytes() // max(1, local_world_size),
        backend="gloo",
    )


def set_current(info: DeviceInfo) -> torch.device:
    device = torch.device(info.torch_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA events on the current stream"
    return "time.perf_counter (CPU ops are synchronous)"


class Timer:
    """Times one region: CUDA events on GPU, perf_counter on CPU.

    Usage: `t = Timer(device); t.start(); work(); seconds = t.stop()`. `stop` synchronises, so
    the result is the device time of the region and nothing queued after it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._t0 = 0.0
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if device.type == "cuda":
            self._events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )

    def start(self) -> None:
        if self._events is not None:
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self._events is not None:
            self._events[1].record()
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return time.perf_counter() - self._t0


def time_region(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds `fn()` takes on `device` (synchronised before and after)."""
    synchronize(device)
    timer = Timer(device)
    timer.start()
    fn()
    return timer.stop()


def reset_peak_memory(device: torch.device) -> int | None:
    """Reset the peak counter; returns bytes allocated now (None on CPU: no allocator stats)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def peak_memory_since(device: torch.device, baseline: int | None) -> int | None:
    """Peak bytes allocated above `baseline` since the last reset (None on CPU)."""
    if device.type != "cuda" or baseline is None:
        return None
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)) - baseline


def driver_version() -> str | None:
    """The NVIDIA driver version via NVML or nvidia-smi; None without either."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML absent or broken: fall back to nvidia-smi, never fail the run
        pass
    out = _nvidia_smi(["--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _nvidia_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def nvlink_counts() -> dict[int, int] | None:
    """Active NVLink links per GPU index via NVML (nvidia-ml-py); None where NVML is absent."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    counts: dict[int, int] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            active = 0
            for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(handle, link):
                        active += 1
                except pynvml.NVMLError:
                    break
            counts[i] = active
    finally:
        pynvml.nvmlShutdown()
    return counts


def topology_facts(kind: DeviceKind) -> str | None:
    """`nvidia-smi topo -m` text plus NVLink counts on GPU; None on CPU or when unavailable."""
    if kind is not DeviceKind.GPU:
        return None
    parts = []
    topo = _nvidia_smi(["topo", "-m"])
    if topo:
        parts.append(topo.rstrip())
    links = nvlink_counts()
    if links is not None:
        parts.append(
            "NVML active NVLinks per GPU: " + ", ".join(f"{k}:{v}" for k, v in links.items())
        )
    return "\n".join(parts) or None
