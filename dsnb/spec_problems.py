"""Every problem of a spec at once: :class:`Problem` and the check tables the specs run.

A spec's checks are a table of small functions, one per field or per pair of fields that
must agree. :func:`collect` runs the whole table and returns every :class:`Problem`; the
specs' constructors raise the first one as an :class:`~dsnb.errors.InvalidSpecError`, and
the launch form shows each one beside its field.

Example:
    >>> def check_nodes(values):
    ...     if values["nodes"] < 1:
    ...         raise InvalidSpecError("nodes", f"must be a whole number >= 1, got {values['nodes']!r}", "set nodes=1 or more")
    >>> def check_world(values):
    ...     raise AssertionError("not run while nodes has a problem")
    >>> table = (Check(check_nodes), Check(check_world, needs=("nodes",)))
    >>> [p.message for p in collect(table, {"nodes": 0})]
    ['JobSpec.nodes: must be a whole number >= 1, got 0. Fix: set nodes=1 or more']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dsnb.errors import InvalidSpecError


@dataclass(frozen=True)
class Problem:
    """One invalid field of a spec: what is wrong and how to fix it.

    Attributes:
        field: dotted name of the field, as :attr:`InvalidSpecError.field` names it.
        problem: what is wrong.
        fix: how to fix it.
        spec: the spec class the field belongs to (``"JobSpec"``, ``"ServeSpec"``, ...).

    Example:
        >>> Problem("nodes", "must be a whole number >= 1, got 0", "set nodes=1 or more").message
        'JobSpec.nodes: must be a whole number >= 1, got 0. Fix: set nodes=1 or more'
    """

    field: str
    problem: str
    fix: str
    spec: str = "JobSpec"

    @classmethod
    def of(cls, error: InvalidSpecError) -> Problem:
        """The problem an :class:`InvalidSpecError` reports."""
        return cls(error.field, error.problem, error.fix, error.spec)

    def error(self) -> InvalidSpecError:
        """This problem as the error a constructor raises."""
        return InvalidSpecError(self.field, self.problem, self.fix, spec=self.spec)

    @property
    def message(self) -> str:
        """``Spec.field: problem. Fix: fix``, the text of :meth:`error`."""
        return str(self.error())


#: A check reads the spec's field values and raises InvalidSpecError for its first problem,
#: or returns the problems it found (a check that reports several at once).
CheckFunction = Callable[[Mapping[str, Any]], "Iterable[Problem] | None"]


@dataclass(frozen=True)
class Check:
    """A row of a check table.

    Attributes:
        run: the check function.
        needs: fields this check relies on; it is skipped while one of them (or a part of
            one, such as ``resources.gpus`` of ``resources``) already has a problem.
    """

    run: CheckFunction
    needs: tuple[str, ...] = ()

    def blocked_by(self, problems: Iterable[Problem]) -> bool:
        """Whether a problem already concerns a field this check needs."""
        return any(_overlaps(p.field, need) for p in problems for need in self.needs)


def _overlaps(field: str, need: str) -> bool:
    """``field`` and ``need`` are the same field, or one is a dotted part of the other."""
    return field == need or field.startswith(need + ".") or need.startswith(field + ".")


def collect(table: Iterable[Check], values: Mapping[str, Any], spec: str = "JobSpec") -> list[Problem]:
    """Run every check of ``table`` on ``values``; every problem found, in table order.

    Args:
        table: the checks, in the order their problems should be reported.
        values: the spec's field values by name.
        spec: the spec class named in the problems.

    Raises:
        TypeError: a check met a value of a type it cannot read at all (not a spec problem).
    """
    problems: list[Problem] = []
    for check in table:
        if check.blocked_by(problems):
            continue
        try:
            found = list(check.run(values) or ())
        except InvalidSpecError as e:
            found = [Problem.of(e)]
        problems.extend(dataclasses.replace(p, spec=spec) for p in found)
    return problems


def raise_first(problems: list[Problem]) -> None:
    """Raise the first of ``problems`` as an InvalidSpecError; nothing when there are none.

    Raises:
        InvalidSpecError: the first problem.
    """
    if problems:
        raise problems[0].error()


def field_values(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` completed with the defaults of the dataclass ``cls``; a required field that
    is missing reads as None (so that its check reports it).

    Raises:
        TypeError: a key that is not a field of ``cls``, as calling ``cls(**fields)`` would.
    """
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {unknown[0]!r}")
    values = {}
    for name, f in known.items():
        if name in fields:
            values[name] = fields[name]
        elif f.default is not dataclasses.MISSING:
            values[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[name] = f.default_factory()
        else:
            values[name] = None
    return values
