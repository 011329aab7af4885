"""A function as a job: packing and its refusals, the rank runner, and reading rank 0's result.

Every backend runs a function job in the conformance suite
(``test_a_function_runs_on_every_rank_and_rank_0_returns_its_value``); here are the parts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest

from dsnb import Cluster, InvalidSpecError, JobFailed, JobSpec, JobState
from dsnb.function_job import MAX_PAYLOAD_CHARS, RUNNER_TEXT, PackedFunction, ResultUnavailable, pack, read_result
from dsnb.runtime import function_runner
from dsnb.status import LogLine
from dsnb.widgets.markup import is_shown


def scaled(values, factor=2):
    return [v * factor for v in values]


def _refusal(**fields) -> InvalidSpecError:
    with pytest.raises(InvalidSpecError) as info:
        JobSpec(name="fn", **fields)
    assert info.value.fix
    return info.value


# -- the spec ---------------------------------------------------------------------------------
def test_a_closure_is_packed_by_value_and_a_stored_spec_equals_the_one_made() -> None:
    bias = 5

    def shifted(x):
        return x + bias

    spec = JobSpec(name="fn", function=shifted, kwargs={"x": 1}, procs_per_node=2)
    assert isinstance(spec.function, PackedFunction) and spec.function.name.endswith("shifted")
    assert spec.kwargs == {"x": 1}  # kept to show
    stored = JobSpec.from_dict(spec.to_dict())
    assert stored == spec and stored.kwargs is None and stored.to_dict()["kwargs"] is None
    changed = dataclasses.replace(spec, nodes=3)
    assert changed.function == spec.function and changed.world_size == 6
    assert spec.with_unique_name().function == spec.function
    assert "shifted" in repr(spec) and spec.function.payload not in repr(spec)


def test_the_runner_calls_the_packed_function_and_rank_0_prints_its_value() -> None:
    packed = pack(scaled, {"values": [1, 2], "factor": 3})
    ran = subprocess.run(packed.argv(python=sys.executable), capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RANK": "0"})
    assert ran.returncode == 0, ran.stderr
    assert read_result(ran.stdout.splitlines(), packed) == [3, 6]
    quiet = subprocess.run(packed.argv(python=sys.executable), capture_output=True, text=True, timeout=60,
                           env={**os.environ, "RANK": "1"})
    assert quiet.returncode == 0 and quiet.stdout == ""  # only rank 0 reports


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"function": 3}, "function", "must be a function"),
    ({"function": ValueError}, "function", "must be a function"),
    ({"function": lambda: (yield)}, "function", "generator"),
    ({"function": scaled, "script": "train.py"}, "script", "got script and function"),
    ({"function": scaled, "args": ["--x"]}, "args", "kwargs, not command-line args"),
    ({"script": "train.py", "kwargs": {"a": 1}}, "kwargs", "only for a function job"),
    ({"function": scaled, "kwargs": ["values"]}, "kwargs", "dict of keyword arguments"),
    ({"function": scaled, "kwargs": {"not a name": 1}}, "kwargs", "dict of keyword arguments"),
    ({"function": scaled, "kwargs": {"hub_token": "hf_abcdefghijklmn"}}, "kwargs.hub_token", "credential"),
    ({"function": scaled, "kwargs": {"url": "postgres://app:hunter2@db/app"}}, "kwargs.url", "credential"),
    ({"function": scaled, "kwargs": {"hub": {"tokens": ["hf_abcdefghijklmn"]}}}, "kwargs.hub.tokens[0]", "credential"),
])
def test_what_cannot_be_a_function_job_is_refused_naming_the_field(fields, field, words) -> None:
    error = _refusal(**fields)
    assert error.field == field and words in error.problem, str(error)
    assert "hunter2" not in str(error) and "hf_abcdefghijklmn" not in str(error)


def test_an_unpicklable_or_oversized_call_is_refused_before_anything_starts() -> None:
    lock = threading.Lock()
    error = _refusal(function=scaled, kwargs={"values": lock})
    assert error.field == "function" and "cannot be pickled" in error.problem and "lock" in error.problem
    dataset = list(range(100_000))

    def count():
        return len(dataset)

    error = _refusal(function=count)
    assert error.field == "function" and f"{MAX_PAYLOAD_CHARS // 1024} KiB" in error.problem
    assert "inside the function" in error.fix
    assert JobSpec.problems(name="fn", function=count)[0].field == "function"  # the form's view of it


# -- the runner's limits ------------------------------------------------------------------------
def test_a_rank_with_another_python_or_without_cloudpickle_says_so_and_exits() -> None:
    packed = pack(scaled, {"values": [1]})
    other = subprocess.run([sys.executable, "-c", RUNNER_TEXT, packed.payload, "3.99"], capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 1 and "packed on Python 3.99" in other.stderr and "this rank runs Python 3." in other.stderr
    bare = subprocess.run([sys.executable, "-S", "-c", RUNNER_TEXT, packed.payload, packed.python], capture_output=True,
                          text=True, timeout=60)  # -S: no site-packages, so no cloudpickle
    assert bare.returncode == 1 and "needs cloudpickle" in bare.stderr, bare.stderr


def test_a_large_value_comes_back_in_chunks_among_other_lines() -> None:
    packed = pack(scaled, {"values": []})
    value = os.urandom(60_000)  # incompressible: several 8000-character lines
    lines = function_runner.result_lines(value, packed.digest)
    assert len(lines) > 5 and all(len(line) < 8100 for line in lines)
    other = function_runner.result_lines("another job's", "0" * 16)
    mixed = ["step 1", *reversed(lines[:3]), *other, "loss=0.5", *lines[3:]]
    assert read_result(mixed, packed) == value
    with pytest.raises(ResultUnavailable, match="2 of 1 found|not in its logs"):
        read_result(other + lines[1:], packed)


def test_a_value_that_cannot_travel_is_reported_instead() -> None:
    packed = pack(scaled, {"values": []})
    too_big = function_runner.result_lines(os.urandom(function_runner.MAX_RESULT_BYTES + 1), packed.digest)
    with pytest.raises(ResultUnavailable, match="return its path"):
        read_result(too_big, packed)
    unpicklable = function_runner.result_lines(threading.Lock(), packed.digest)
    with pytest.raises(ResultUnavailable, match="cannot be pickled"):
        read_result(unpicklable, packed)
    assert not is_shown(LogLine(0, too_big[0], 0.0)) and not is_shown(LogLine(0, unpicklable[0], 0.0))


# -- jobs --------------------------------------------------------------------------------------
def _failing(code: int):
    import os
    import sys

    if os.environ["RANK"] == "1":
        print("about to fail: marker-fn-1", flush=True)
        raise RuntimeError(f"rank failed with {code}")
    sys.exit(0)


def _generator_value():
    return (i for i in range(3))


def test_jobs_that_fail_return_nothing_or_run_no_function_say_why(tmp_path) -> None:
    cluster = Cluster("local", home=str(tmp_path))
    failing = cluster.submit(JobSpec(name="fn-fail", function=_failing, kwargs={"code": 7}, procs_per_node=2))
    with pytest.raises(JobFailed) as info:
        failing.result(timeout=120)
    assert info.value.status.failed_rank == 1 and info.value.status.exit_code == 1
    assert any("RuntimeError: rank failed with 7" in line for line in info.value.status.last_lines)
    odd = cluster.submit(JobSpec(name="fn-gen", function=_generator_value))
    with pytest.raises(ResultUnavailable, match="cannot be pickled"):
        odd.result(timeout=120)
    assert odd.status().state == JobState.SUCCEEDED  # the work is done; only its value could not travel
    script = cluster.submit(JobSpec(name="cmd", command=[sys.executable, "-c", "print(1)"]))
    with pytest.raises(ResultUnavailable, match="not a function"):
        script.result(timeout=120)
