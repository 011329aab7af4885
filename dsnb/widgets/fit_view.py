"""The launch form's "will it fit" box: the model to train, and the memory it needs under the form's spec.

As the user types, :class:`FitView` estimates the model's memory per GPU and per node for the
spec's ZeRO stage, offload settings and world size (:func:`dsnb.fit.estimate`) and compares it with
what the form's backend offers (:meth:`~dsnb.backends.base.Backend.memory_there`). Sizing a model
directory and asking a cluster for its nodes are done once per model and per resource shape.

Example:
    >>> view = FitView()                          # doctest: +SKIP
    >>> view.model.value = "7e9"                  # doctest: +SKIP
    >>> view.update(Cluster().backend, spec)      # doctest: +SKIP
    >>> view.estimate.verdict                     # doctest: +SKIP
    'does not fit'
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from dsnb.errors import InvalidSpecError
from dsnb.fit import FitEstimate, MemoryThere, ModelSize, estimate, model_size

#: The colour of each verdict in the box.
#: Model texts whose size is kept (each keystroke is a text).
SIZES_KEPT = 16
VERDICT_COLOURS = {"fits": "#1a7f37", "fits with activation checkpointing": "#a15c00", "does not fit": "#cf222e",
                   "unknown": "#57606a"}


class FitView:
    """The form's model and sequence-length fields and the estimate under them.

    Attributes:
        model: what to size: a parameter count (``7e9``) or a Hugging Face model directory.
        sequence_length: tokens per sample (0: activations not estimated).
        view: the estimate, or why there is none.
        estimate: the last estimate, None when there is none.

    Raises:
        BackendUnavailable: ipywidgets is not installed (on import of :mod:`dsnb.widgets.form`).
    """

    def __init__(self) -> None:
        self.model = widgets.Text(description="Model (fit)", placeholder="7e9, or a model directory",
                                  layout=widgets.Layout(width="420px"))
        self.sequence_length = widgets.IntText(description="Sequence length", value=0, layout=widgets.Layout(width="260px"))
        self.view = widgets.HTML()
        self.view.add_class("dsnb-fit")
        for widget, css in ((self.model, "dsnb-fit-model"), (self.sequence_length, "dsnb-fit-seq-len")):
            widget.add_class(css)
        self.estimate: FitEstimate | None = None
        self._sizes: dict[str, ModelSize | InvalidSpecError] = {}
        self._there: dict[tuple[Any, ...], MemoryThere] = {}
        self._backend: Any = None

    def children(self) -> list[widgets.Widget]:
        """The box's widgets, top to bottom."""
        return [widgets.HTML("<b>Will it fit?</b>"), self.model, self.sequence_length, self.view]

    def update(self, backend: Any, spec: Any) -> None:
        """Estimate again for ``spec`` on ``backend`` (None: the form has problems) and show it."""
        text = self.model.value.strip()
        self.estimate = None
        if not text:
            self.view.value = "<i>give a model (a parameter count or a model directory) to see whether it fits</i>"
            return
        if spec is None:
            self.view.value = "<i>fix the fields marked above to see whether it fits</i>"
            return
        size = self._size(text)
        if isinstance(size, InvalidSpecError):
            self.view.value = f"<span style='color:#cf222e'>{html.escape(f'{size.field}: {size.problem}')}</span>"
            return
        there = self._memory_there(backend, spec)
        seq = self.sequence_length.value if self.sequence_length.value > 0 else None
        try:
            fit = estimate(size, spec, sequence_length=seq, gpu_memory=there.gpu, cpu_memory=there.cpu)
        except ImportError as e:
            self.view.value = f"<i>{html.escape(f'cannot estimate here: {e}; pip install deepspeed')}</i>"
            return
        self.estimate = fit
        colour = VERDICT_COLOURS[fit.verdict]
        self.view.value = (f"<div><b style='color:{colour}' class='dsnb-fit-verdict'>{html.escape(fit.verdict)}</b>"
                           f" <small>({html.escape(there.source)})</small></div>"
                           f"<pre style='margin:2px 0'>{html.escape(str(fit))}</pre>")

    def _size(self, text: str) -> ModelSize | InvalidSpecError:
        """The model's size, sized once per text (a directory is built on the meta device)."""
        if text not in self._sizes:
            try:
                model: Any = float(text)
            except ValueError:
                model = text
            if len(self._sizes) >= SIZES_KEPT:
                self._sizes.pop(next(iter(self._sizes)))
            try:
                self._sizes[text] = model_size(model)
            except InvalidSpecError as e:
                self._sizes[text] = e
            except ImportError as e:
                self._sizes[text] = InvalidSpecError("model", f"cannot be sized here ({e})",
                                                     "give a parameter count, e.g. 7e9", spec="estimate")
        return self._sizes[text]

    def _memory_there(self, backend: Any, spec: Any) -> MemoryThere:
        """What ``backend`` offers a node of ``spec``, asked once per backend and resource shape."""
        if backend is not self._backend:
            self._backend, self._there = backend, {}
        key = (spec.resources.gpus, spec.resources.memory, spec.procs_per_node)
        if key not in self._there:
            self._there[key] = backend.memory_there(spec)
        return self._there[key]
