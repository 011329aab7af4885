"""The Ray driver log follower against a fake job client: every line once, in order, through drops and stalls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace

from helpers import wait_until

from dsnb.backends.ray.log_follower import DriverLogFollower

LOG = "".join(f"line {i}\n" for i in range(40)) + "the last line, without its newline"


def texts(follower: DriverLogFollower) -> list[str]:
    return [line.text for line in follower.logs.read(0, None, 1000)[0]]


class FakeRay:
    """A job client whose driver log is ``LOG`` up to ``written`` characters.

    Each tail (like Ray's) starts at the first character and sends the log in 7-character
    chunks; ``tails`` says how each connection ends: "drop" raises after ``drop_after``
    characters, "end" ends once the whole log was sent, "hang" sends nothing and never ends.
    """

    def __init__(self, tails: list[str], written: int = len(LOG), drop_after: int = 100) -> None:
        self.tails = list(tails)
        self.written = written
        self.drop_after = drop_after
        self.state = "RUNNING"
        self.full_reads = 0
        self.connections = 0
        self.go = threading.Event()  # a tail sends nothing before it is set
        self.go.set()

    def get_job_logs(self, job: str) -> str:
        self.full_reads += 1
        return LOG[:self.written]

    def get_job_info(self, job: str) -> SimpleNamespace:
        return SimpleNamespace(status=self.state)

    async def tail_job_logs(self, job: str) -> AsyncIterator[str]:
        self.connections += 1
        how = self.tails.pop(0) if self.tails else "hang"
        while not self.go.is_set():
            await asyncio.sleep(0.01)
        if how == "hang":
            await asyncio.Event().wait()
        sent = 0
        while sent < self.written:
            if how == "drop" and sent >= self.drop_after:
                raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
            chunk = LOG[sent:min(sent + 7, self.written)]
            sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)


def test_chunks_from_any_start_are_cut_to_what_is_new() -> None:
    """The catch-up and dedupe logic alone: a tail cut mid-line, a full read, a tail that starts over."""
    follower = DriverLogFollower(FakeRay([], written=30), "j")
    follower.take(LOG[:12], 0)  # "line 0\nline " : the second line is not complete
    assert texts(follower) == ["line 0"] and follower.offset == 12
    follower.catch_up()  # the whole log so far: only characters 12..30 are new
    assert texts(follower) == ["line 0", "line 1", "line 2", "line 3"] and follower.offset == 30
    for at in range(0, 50, 5):  # a new tail sends everything again, from the first character
        follower.take(LOG[at:at + 5], at)
    assert texts(follower) == [f"line {i}" for i in range(7)] and follower.offset == 50
    follower.client.written = len(LOG)
    follower.finish()  # the ended job's last line counts, newline or not
    assert texts(follower) == [f"line {i}" for i in range(40)] + ["the last line, without its newline"]
    assert follower.complete and follower.offset == len(LOG)


def test_a_dropped_tail_is_caught_up_once_and_followed_again_until_the_job_ends() -> None:
    client = FakeRay(["drop", "end"])
    follower = DriverLogFollower(client, "j", retry_s=0.01)
    client.written = 20
    client.go.clear()
    follower.follow()  # the log so far, read at once
    assert texts(follower) == ["line 0", "line 1"] and client.full_reads == 1
    client.written = len(LOG)
    client.state = "SUCCEEDED"
    client.go.set()
    wait_until(lambda: not follower.alive, timeout=10)
    assert client.connections == 2 and follower.drops == 1
    assert client.full_reads == 2  # one catch-up after the drop, no other full read
    assert texts(follower) == [f"line {i}" for i in range(40)]  # the last line waits for its newline
    follower.finish()
    assert texts(follower) == [f"line {i}" for i in range(40)] + ["the last line, without its newline"]
    follower.follow()  # the job has ended: nothing starts again
    assert not follower.alive and client.connections == 2


def test_a_stalled_tail_is_opened_again() -> None:
    client = FakeRay(["hang", "end"])
    follower = DriverLogFollower(client, "j", stall_s=0.2, retry_s=0.01)
    client.written = 0
    follower.follow()
    client.written = len(LOG)
    client.state = "SUCCEEDED"
    wait_until(lambda: not follower.alive, timeout=10)
    assert client.connections == 2 and follower.drops == 1
    assert texts(follower) == [f"line {i}" for i in range(40)]


def test_stop_ends_a_thread_waiting_on_a_quiet_tail() -> None:
    client = FakeRay(["hang"])
    follower = DriverLogFollower(client, "j")
    follower.follow()
    wait_until(lambda: client.connections == 1, timeout=10)
    follower.stop(timeout=5)
    assert not follower.alive
    assert not [t for t in threading.enumerate() if t.name == "dsnb-ray-logs-j"]
