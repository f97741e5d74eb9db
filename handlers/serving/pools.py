"""Separate worker pools for predictions and explanations (docs/pools.md).

One build is served as two TorchServe models: ``<name>`` for predictions and ``<name>-explain``
for explanations, each with its own workers and batching (TorchServe batches per model, so an
explanation never shares a batch with predictions). The ``handler.pool`` section of an archive
says which requests its workers answer and at what CPU priority they run: the explanation
pool's workers lower their own priority, so that the prediction workers win the cores and the
explanations run on what is left.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .device import usable_cores

EXPLAIN_SUFFIX = "-explain"
# The explanation pool's defaults (docs/pools.md). Niceness 10 leaves a
# competing nice-0 thread about 10 times its CPU share; at 19 (about 70 times) explanations
# starved beside a prediction load on a busy machine. One thread: torch's threads wait for each
# other at every parallel region, and at a low priority one of them is often not running.
EXPLAIN_NICE = 10
EXPLAIN_THREADS = 1


def explanation_model(name: str) -> str:
    """The name of the explanation pool of the model ``name``."""
    return f"{name}{EXPLAIN_SUFFIX}"


class PoolSettings(BaseModel):
    """The ``handler.pool`` section: which requests this model answers, at what CPU priority."""

    model_config = ConfigDict(extra="forbid")

    explanations: bool = Field(
        default=True, description="whether this model answers explanations (off on a prediction pool)"
    )
    explanation_model: str | None = Field(
        default=None, min_length=1, description="the model that answers them; named in the refusal"
    )
    nice: int = Field(
        default=0, ge=0, le=19, description="added to the niceness of every thread of the worker in initialize"
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch threads per worker on CPU; None: the cores / minWorkers"
    )

    @model_validator(mode="after")
    def _refusal_names_a_model(self) -> "PoolSettings":
        if not self.explanations and not self.explanation_model:
            raise ValueError("pool.explanation_model must name the model that answers explanations "
                             "when pool.explanations is off")
        return self


def cpu_threads(pool: PoolSettings, workers: int) -> int:
    """The torch threads of one CPU worker: the pool's setting, or the cores shared by its workers."""
    return pool.threads or max(1, usable_cores() // workers)


def thread_ids() -> list[int]:
    """The ids of this process's threads (Linux), or just the process where /proc is missing."""
    tasks = Path("/proc/self/task")
    return sorted(int(p.name) for p in tasks.iterdir()) if tasks.is_dir() else [os.getpid()]


def lower_priority(increment: int) -> None:
    """Add ``increment`` to the niceness of every thread of this process.

    On Linux ``os.nice`` changes the calling thread only; the threads that exist already (the
    worker's own) are reniced one by one, and the threads started later (torch's intra-op and
    inter-op pools) inherit the niceness of the thread that starts them. Raising niceness needs
    no privilege.
    """
    if increment <= 0:
        return
    for tid in thread_ids():
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
