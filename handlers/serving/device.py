"""Where a worker computes, for every engine: CUDA where there is one, else the CPU with a given
number of torch threads; and how many cores the process may use (``usable_cores``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: the CPUs it may run on, capped by the CPU quota of its
    cgroup (a container's CPU limit: Kubernetes' ``limits.cpu``), rounded up. ``os.cpu_count()``
    counts the node's cores, which in a pod limited to 2 CPUs on a 64-core node would start 64
    threads per pass."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs of the cgroup's quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None without one."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup / "cpu" if (cgroup / "cpu").is_dir() else cgroup
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def place(threads: int, gpu_id: int | str | None = None, gpu_without_id: bool = True) -> torch.device:
    """The worker's device: ``cuda:<gpu_id>`` (or ``cuda`` when no id is given and
    ``gpu_without_id``) where CUDA is available, else the CPU, whose torch threads are set to
    ``threads`` here."""
    if torch.cuda.is_available() and (gpu_id is not None or gpu_without_id):
        return torch.device(f"cuda:{gpu_id}" if gpu_id is not None else "cuda")
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu")
