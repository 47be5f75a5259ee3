"""The one place that knows CPU from GPU: device, backend, precision, threads and memory stats.

Owns: `Runtime` (device, collective backend, autocast, memory counters) and `make_runtime`.
Does not own: the mesh (mesh.py) or which precision the plan asks for (train.py reads it).
Everything GPU-specific in the executor goes through `Runtime`, so the CPU path never touches
CUDA APIs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass

import torch

from planner.specs import Dtype

_TORCH_DTYPE = {Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16}


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where this process computes. `compute_dtype` is the autocast dtype (fp32 means none)."""

    device: torch.device
    backend: str
    compute_dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16/fp16 autocast on GPU; CPU always trains in fp32 (no autocast)."""
        if self.is_cuda and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int:
        """Peak allocated device memory on GPU; on CPU the process's peak resident set size
        (getrusage ru_maxrss: KiB on Linux, bytes on macOS), which includes the interpreter."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def cpu_threads(local_world_size: int) -> int:
    """Cores this process may use (its CPU affinity) per local process, at least 1:
    oversubscribing cores made a 4-rank CPU run 8x slower in our trials (issue 6)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size))


def make_runtime(kind: str, *, local_rank: int, local_world_size: int, dtype: Dtype) -> Runtime:
    """`kind` is "cpu" or "cuda". CPU: gloo, fp32, threads = cores // local ranks. CUDA: nccl,
    this process's local GPU, the plan's dtype under autocast."""
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return Runtime(
            device=torch.device("cuda", local_rank),
            backend="nccl",
            compute_dtype=_TORCH_DTYPE[dtype],
        )
    # Set even when OMP_NUM_THREADS is: torchrun exports OMP_NUM_THREADS=1 for every multi-process
    # job, which would leave most cores idle. Restrict cores with taskset/cpusets instead.
    torch.set_num_threads(cpu_threads(local_world_size))
    return Runtime(device=torch.device("cpu"), backend="gloo", compute_dtype=torch.float32)
