"""A backend whose status, output and metrics a test sets by hand, for monitors and views."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from dsnb import JobSpec, JobState, JobStatus, LogLine, MetricSample
from dsnb.backends.base import LogChunk, MetricChunk


class ScriptedBackend:
    """Cursors are list offsets; ``chunk`` bounds one read and ``read_delay`` slows each log read."""

    name = "scripted"

    def __init__(self, status: JobStatus | None = None, lines: list[LogLine] | None = None,
                 samples: list[MetricSample] | None = None, chunk: int = 1000) -> None:
        self.current = status or JobStatus(name="job-abcd", backend=self.name, state=JobState.RUNNING,
                                           started_at=100.0, created_at=99.0)
        self.lines: list[LogLine] = list(lines or [])
        self.samples: list[MetricSample] = list(samples or [])
        self.chunk = chunk
        self.read_delay = 0.0

    def status(self, name: str) -> JobStatus:
        return self.current

    def spec_of(self, name: str) -> JobSpec:
        return JobSpec(name=name, command=["true"], nodes=2, procs_per_node=4)

    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        start = cursor or 0
        time.sleep(self.read_delay)  # lets another thread in between cursor reads
        batch = self.lines[start:start + self.chunk]
        return LogChunk(lines=batch, cursor=start + len(batch))

    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        start = cursor or 0
        batch = self.samples[start:start + self.chunk]
        return MetricChunk(samples=batch, cursor=start + len(batch))

    def finish(self, state: JobState = JobState.SUCCEEDED) -> None:
        self.current = replace(self.current, state=state, finished_at=110.0)
