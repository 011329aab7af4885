"""The launch form's backend options: one field per option the chosen backend declares.

The fields come from the backend's :attr:`~dsnb.backends.base.Backend.options` (the same table
the command line's flags come from), so a new backend's options appear without a change here.
Options that are Python objects or secrets (``on_command_line=False``: a ``Configuration``, a
token) get no field; pass them to ``Cluster(...)`` in code.

Example:
    >>> box = BackendOptionsBox()                     # doctest: +SKIP
    >>> box.show("statefulset")                       # doctest: +SKIP
    >>> box.fields["namespace"].value = "ml"          # doctest: +SKIP
    >>> box.values()                                  # doctest: +SKIP
    {'namespace': 'ml'}
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from dsnb.backends.base import backend_options
from dsnb.backends.options import Option


class BackendOptionsBox:
    """Text fields for the options of one backend; empty fields keep the backend's default."""

    def __init__(self) -> None:
        self.backend = ""
        self.options: tuple[Option, ...] = ()
        self.fields: dict[str, W.Text] = {}
        self.widget = W.VBox()
        self.widget.add_class("dsnb-backend-options")

    def show(self, backend: str) -> None:
        """Show the fields of ``backend``'s options (none when it cannot be loaded here).

        Raises:
            Nothing: a backend whose extra is missing shows no fields.
        """
        try:
            declared = backend_options(backend)
        except ImportError:
            declared = ()
        self.backend = backend
        self.options = tuple(o for o in declared if o.on_command_line)
        self.fields = {o.name: _field(o) for o in self.options}
        self.widget.children = tuple(self.fields.values())

    def values(self) -> dict[str, Any]:
        """The options filled in, parsed to their types.

        Raises:
            InvalidSpecError: a value its option does not take (named, with what it takes).
        """
        return {o.name: o.parse(self.fields[o.name].value.strip())
                for o in self.options if self.fields[o.name].value.strip()}


def _field(option: Option) -> W.Text:
    hint = option.help if option.choices is None else f"{option.help}; one of {', '.join(option.choices)}"
    field = W.Text(description=option.name, placeholder=hint, tooltip=hint, layout=W.Layout(width="640px"))
    field.style.description_width = "160px"
    return field
