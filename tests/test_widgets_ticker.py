"""The shared ticker: one thread for every live panel, started by the first and ended with the last;
a failing or collected callback leaves the others ticking. And each handle keeps one panel."""

from __future__ import annotations

import doctest
import gc
import threading
import time

import pytest
from helpers import wait_until
from scripted import ScriptedBackend

from dsnb.job import Job
from dsnb.monitor import JobMonitor
from dsnb.widgets import ticker as ticker_module
from dsnb.widgets.display import PANEL_ATTR, panel_for
from dsnb.widgets.panel import JobPanel
from dsnb.widgets.ticker import MIN_INTERVAL_S, Ticker


def threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def scripted_job(name: str) -> Job:
    return Job(ScriptedBackend(), name)  # type: ignore[arg-type]


def test_module_examples():
    result = doctest.testmod(ticker_module)
    assert result.attempted > 0 and result.failed == 0


def test_two_panels_share_one_thread_and_closing_both_ends_it():
    ticker = Ticker(name="dsnb-test-ticker-panels")
    now = [100.0]
    panels = []
    for name in ("first-abcd", "second-abcd"):
        job = scripted_job(name)
        panels.append(JobPanel(job, JobMonitor(job, clock=lambda: now[0]), plot_interval=0.1, shared_ticker=ticker))
    first, second = panels
    try:
        assert len(ticker) == 2 and first.ticker.is_alive() and second.ticker.is_alive()
        thread = ticker.thread
        assert thread is not None and thread.is_alive()
        assert threads_named(ticker.name) == [thread]  # one thread, not one per panel
        assert not [t for t in threading.enumerate() if t.name.startswith("dsnb-panel-")]
        wait_until(lambda: first.elapsed_label.value and second.elapsed_label.value)
        now[0] += 60.0  # the ticks refresh the elapsed time although nothing new arrives
        wait_until(lambda: first.elapsed_label.value == second.elapsed_label.value == "elapsed 1m 00s")

        first.close()
        assert not first.ticker.is_alive() and second.ticker.is_alive()
        assert ticker.thread is thread and len(ticker) == 1  # the other panel still ticks
    finally:
        for panel in panels:
            panel.close()
    assert not second.ticker.is_alive() and len(ticker) == 0
    thread.join(5)
    assert not thread.is_alive() and ticker.thread is None and threads_named(ticker.name) == []


def test_a_failing_callback_does_not_stop_the_others(caplog):
    ticker = Ticker(name="dsnb-test-ticker-failing")
    ticks: list[float] = []

    def broken() -> None:
        raise RuntimeError("broken view")

    failing = ticker.register(broken, interval=MIN_INTERVAL_S)
    counting = ticker.register(lambda: ticks.append(time.monotonic()), interval=MIN_INTERVAL_S)
    try:
        wait_until(lambda: len(ticks) >= 5 and failing.failures >= 5)
        assert ticker.thread is not None and ticker.thread.is_alive() and failing.is_alive()
        warnings = [r for r in caplog.records if r.name == ticker_module.__name__ and r.levelname == "WARNING"]
        assert len(warnings) == 1 and "broken view" in warnings[0].exc_text  # once, not once a tick
    finally:
        failing.cancel()
        counting.cancel()
    assert failing.join(5) and counting.join(5)


def test_the_thread_stops_when_the_last_owner_is_collected():
    ticker = Ticker(name="dsnb-test-ticker-collected")

    class View:
        ticks = 0

        def refresh(self) -> None:
            View.ticks += 1

    view = View()
    ticking = ticker.register(view.refresh, interval=MIN_INTERVAL_S)
    thread = ticker.thread
    wait_until(lambda: View.ticks >= 2)
    del view
    gc.collect()
    assert ticking.join(5) and not ticking.is_alive()  # a dropped view stops ticking by itself
    thread.join(5)
    assert not thread.is_alive() and ticker.thread is None and len(ticker) == 0


def test_a_callback_may_cancel_itself_and_a_later_registration_starts_a_new_thread():
    ticker = Ticker(name="dsnb-test-ticker-self")
    calls: list[bool] = []
    holder: dict[str, object] = {}

    def once() -> None:
        ticking = holder["ticking"]
        ticking.cancel()  # type: ignore[attr-defined]
        calls.append(ticking.join(5))  # type: ignore[attr-defined]  # on its own thread: returns at once

    holder["ticking"] = ticker.register(once, interval=MIN_INTERVAL_S)
    first = ticker.thread
    assert holder["ticking"].join(5)  # type: ignore[attr-defined]
    first.join(5)
    assert calls == [False] and not first.is_alive() and ticker.thread is None

    again = ticker.register(lambda: None, interval=1.0)
    assert ticker.thread is not None and ticker.thread is not first
    again.cancel()
    again.cancel()  # safe twice
    assert again.join(5)


def test_intervals_below_the_minimum_are_refused():
    with pytest.raises(ValueError, match="interval must be at least"):
        Ticker().register(lambda: None, interval=0.0)


def test_a_job_keeps_one_panel_until_it_is_closed():
    job = scripted_job("cached-abcd")
    assert getattr(job, PANEL_ATTR) is None
    panel = job.panel(start=False)
    assert job.panel() is panel and panel_for(job) is panel and getattr(job, PANEL_ATTR) is panel
    assert panel.ticker is None  # not started: no place on the ticker
    panel.close()
    replaced = job.panel(start=False)
    assert replaced is not panel and not replaced.closed
    replaced.close()
