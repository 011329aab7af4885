"""A failed job's diagnosis: the cause, the rank's last lines, and a hint where a last line is a known one."""
from dsnb.status import JobState, JobStatus

ABORT_AT_EXIT = "terminate called without an active exception"


def failed(last_lines, message="rank 1 was killed by SIGABRT"):
    return JobStatus(name="t-x1", backend="local", state=JobState.FAILED, message=message,
                     failed_rank=1, exit_code=-6, last_lines=tuple(last_lines))


def test_an_abort_at_exit_with_the_process_group_open_says_how_to_end_the_script():
    text = failed(["step 8/8 loss 2.1", ABORT_AT_EXIT]).diagnosis()
    assert text.splitlines()[-1].startswith("hint: ")
    assert "torch.distributed.destroy_process_group()" in text
    assert f"  {ABORT_AT_EXIT}" in text  # the line itself is still shown


def test_other_last_lines_get_no_hint():
    text = failed(["RuntimeError: boom"], message="rank 1 exited with code 1").diagnosis()
    assert "hint:" not in text
    assert text.endswith("  RuntimeError: boom")
