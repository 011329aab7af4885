"""How long a job's name may be, given the names each controller derives from it.

Kubernetes controllers name what they create after the object dsnb creates, and some of
those names must be DNS-1035 labels (63 characters at most). A controller that meets a
name too long does not fail the object: it records a Warning Event and waits for ever. So
each backend checks, before anything is created, the longest name its controller will make.

Example:
    >>> check_derived_names("tiny-gpt-x7k2", ["tiny-gpt-x7k2-worker-1"], "the MPI Operator's worker pods")
    >>> check_derived_names("a" * 50 + "-x7k2", ["a" * 50 + "-x7k2-worker-1"], "the MPI Operator's worker pods")
    Traceback (most recent call last):
    ...
    dsnb.errors.InvalidSpecError: JobSpec.name: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x7k2' is too long: the MPI Operator's worker pods would be named 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x7k2-worker-1' (64 characters, 63 at most). Fix: use a name of at most 49 characters
"""

from __future__ import annotations

from collections.abc import Iterable

from dsnb.errors import InvalidSpecError
from dsnb.spec import _SUFFIX_LEN

#: A DNS-1035 label's length limit (pods' hostnames, Services, Jobs).
MAX_LABEL = 63


def check_derived_names(name: str, derived: Iterable[str], made_by: str) -> None:
    """Refuse ``name`` (a job's unique name) when any name derived from it passes 63 characters.

    Args:
        name: the job's unique name, suffix included.
        derived: the names the controller will make from it.
        made_by: what makes them, in words (e.g. "the MPI Operator's worker pods").

    Raises:
        InvalidSpecError: on ``name``, with the longest derived name and the longest user name that fits.
    """
    longest = max(derived, key=len)
    if len(longest) <= MAX_LABEL:
        return
    room = MAX_LABEL - (len(longest) - len(name)) - 1 - _SUFFIX_LEN  # the user's name, before "-xxxx"
    raise InvalidSpecError("name", f"{name!r} is too long: {made_by} would be named {longest!r} "
                                   f"({len(longest)} characters, {MAX_LABEL} at most)",
                           f"use a name of at most {room} characters")
