"""Where a worker computes, for every engine: CUDA where there is one, else the CPU with a given
number of torch threads."""
from __future__ import annotations

import torch


def place(threads: int, gpu_id: int | str | None = None, gpu_without_id: bool = True) -> torch.device:
    """The worker's device: ``cuda:<gpu_id>`` (or ``cuda`` when no id is given and
    ``gpu_without_id``) where CUDA is available, else the CPU, whose torch threads are set to
    ``threads`` here."""
    if torch.cuda.is_available() and (gpu_id is not None or gpu_without_id):
        return torch.device(f"cuda:{gpu_id}" if gpu_id is not None else "cuda")
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu")
