"""The launch form: fill in a job, see it checked as you type, dry-run, launch or export it.

:class:`LaunchForm` builds a :class:`~dsnb.spec.JobSpec` from its fields on every change, so a
mistake shows up next to the field it concerns (the one the
:class:`~dsnb.errors.InvalidSpecError` names) and Launch stays disabled until it is fixed.
It also advises on the backend (:mod:`dsnb.advisor`) and shows the DeepSpeed config the ranks
will get, batch sizes filled in.

Example:
    >>> from dsnb import Cluster
    >>> form = Cluster().form()          # doctest: +SKIP
    >>> form                             # doctest: +SKIP
    >>> form.nodes.value = 2             # doctest: +SKIP
    >>> form.spec().world_size           # doctest: +SKIP
    2
"""

from __future__ import annotations

import html
import json
import math
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import ipywidgets as widgets
except ImportError as e:  # pragma: no cover - exercised by the no-extras import test
    from dsnb.errors import BackendUnavailable

    raise BackendUnavailable("notebook", "the launch form needs ipywidgets", "pip install 'dsnb[notebook]'") from e

from dsnb import advisor
from dsnb.ds_config import check_deepspeed_config, framework_filled
from dsnb.ds_fields import OFFLOAD_DEVICES, PRECISIONS, merge_config, split_deepspeed, structured_deepspeed
from dsnb.errors import InvalidSpecError
from dsnb.secrets import REDACTED, Secret, is_secret
from dsnb.spec import JobSpec, redact_env
from dsnb.widgets.backend_options import BackendOptionsBox
from dsnb.widgets.display import panel_for
from dsnb.widgets.fit_view import FitView

if TYPE_CHECKING:
    from dsnb.cluster import Cluster
    from dsnb.job import Job

#: Keys of :attr:`LaunchForm.errors`, in the order the fields appear.
FIELD_KEYS: tuple[str, ...] = (
    "name", "script", "command", "args", "working_dir", "nodes", "procs_per_node", "gpus", "cpu",
    "memory", "image", "env", "timeout", "hang_timeout", "max_restarts", "zero_stage", "precision", "micro_batch",
    "grad_accum", "offload_optimizer", "offload_param", "extra_config", "form",
)

# Spec field (as InvalidSpecError.field names it) -> form field key; the longest prefix wins.
_FIELD_TO_KEY: dict[str, str] = {
    "name": "name",
    "script": "script",
    "script/command/function": "script",
    "command": "command",
    "args": "args",
    "working_dir": "working_dir",
    "nodes": "nodes",
    "procs_per_node": "procs_per_node",
    "resources": "gpus",
    "resources.gpus": "gpus",
    "resources.cpu": "cpu",
    "resources.memory": "memory",
    "image": "image",
    "env": "env",
    "timeout": "timeout",
    "hang_timeout": "hang_timeout",
    "max_restarts": "max_restarts",
    "deepspeed": "micro_batch",  # a bare "deepspeed" error from the form means no batch size
    "deepspeed.train_micro_batch_size_per_gpu": "micro_batch",
    "deepspeed.gradient_accumulation_steps": "grad_accum",
    "deepspeed.train_batch_size": "extra_config",
    "deepspeed.zero_optimization": "extra_config",
    "deepspeed.zero_optimization.stage": "zero_stage",
    "deepspeed.zero_optimization.offload_optimizer": "offload_optimizer",
    "deepspeed.zero_optimization.offload_param": "offload_param",
    "deepspeed.fp16": "precision",
    "deepspeed.bf16": "precision",
    "deepspeed.bfloat16": "precision",
    "deepspeed.extra": "extra_config",
}

_DOUBLE_CLICK_S = 2.0
_LABEL_WIDTH = "140px"


def field_key(spec_field: str) -> str:
    """The form field that shows an error about ``spec_field`` (``"form"`` when none does).

    Example:
        >>> field_key("deepspeed.zero_optimization.offload_param.nvme_path")
        'offload_param'
        >>> field_key("env.RANK")
        'env'
    """
    parts = spec_field.split(".")
    for end in range(len(parts), 0, -1):
        key = _FIELD_TO_KEY.get(".".join(parts[:end]))
        if key is not None:
            if key == "micro_batch" and end == 1 and len(parts) > 1:
                return "extra_config"  # e.g. a removed top-level key that came from the extra JSON
            return key
    return "form"


def parse_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines into a dict; blank lines and ``#`` comments are skipped.

    Raises:
        InvalidSpecError: a line without ``=`` or a key set twice (field ``env``).

    Example:
        >>> parse_env("NCCL_DEBUG=WARN\\n# note\\nA=b=c")
        {'NCCL_DEBUG': 'WARN', 'A': 'b=c'}
    """
    env: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            name = line.split()[0].split(":")[0]
            shown = f"line {number} ({name}...)" if is_secret(name, line) else f"line {number} {line!r}"
            raise InvalidSpecError("env", f"{shown} has no '='", f"write it as {name}=value")
        if key in seen:
            raise InvalidSpecError("env", f"{key} is set twice (lines {seen[key]} and {number})", "keep one of them")
        seen[key] = number
        env[key] = value.strip()
    return env


def format_env(env: dict[str, str]) -> str:
    """The inverse of :func:`parse_env`.

    Example:
        >>> format_env({"A": "1", "B": "x y"})
        'A=1\\nB=x y'
    """
    return "\n".join(f"{k}={v}" for k, v in env.items())


def _split(text: str, spec_field: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise InvalidSpecError(spec_field, f"cannot split {text!r} into words ({e})", "close the quote, or escape it with \\") from e


def _parse_number(text: str) -> int | float | str:
    """``"2"`` -> 2, ``"0.5"`` -> 0.5, anything else stays text (for quantities like ``"500m"``)."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def _parse_timeout(text: str, field: str = "timeout") -> float | int | None:
    text = text.strip()
    if not text:
        return None
    value = _parse_number(text)
    if isinstance(value, str):
        raise InvalidSpecError(field, f"{text!r} is not a number of seconds", "write e.g. 3600, or leave it empty for no limit")
    return value


def _pre(text: str) -> str:
    return f"<pre style='margin:0;white-space:pre-wrap'>{html.escape(text, quote=False)}</pre>"


def _error_html(error: InvalidSpecError) -> str:
    return (
        f"<span style='color:#b00020'>{html.escape(error.problem, quote=False)}.</span> "
        f"<span style='color:#555'>Fix: {html.escape(error.fix, quote=False)}</span>"
    )


def _bundle_of(view: Any) -> dict[str, Any]:
    """A display_data output for ``view`` that an Output widget shows, in a kernel or not.

    ``view`` is a widget, an object holding one in ``.widget`` (as JobPanel does), or anything
    with a text (and maybe HTML) form.
    """
    widget = view if isinstance(view, widgets.Widget) else getattr(view, "widget", None)
    if isinstance(widget, widgets.Widget):
        data = {
            "text/plain": repr(view),
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": widget.model_id},
        }
    else:
        data = {"text/plain": repr(view)}
        to_html = getattr(view, "_repr_html_", None)
        if to_html is not None:
            try:
                data["text/html"] = to_html()
            except Exception:  # a status read can fail (job removed); the text form still shows
                pass
    return {"output_type": "display_data", "data": data, "metadata": {}}


class LaunchForm:
    """An ipywidgets form that builds, checks, dry-runs, launches and exports a :class:`JobSpec`.

    Every field is a widget attribute (``form.name``, ``form.nodes``, ``form.zero_stage``, ...);
    ``form.errors[key]`` is the error label next to field ``key``; ``form.job`` is the last
    launched :class:`~dsnb.job.Job`. Display the form by making it a cell's last expression.

    Args:
        cluster: the cluster that dry-runs and launches; choosing another *available* backend
            in the form replaces it with ``Cluster(name)``.
        spec: fill the fields from this spec (see :meth:`load`).

    Raises:
        BackendUnavailable: ipywidgets is not installed (raised on import of this module).

    Example:
        >>> form = LaunchForm(Cluster(), spec=JobSpec(name="demo", script="train.py"))  # doctest: +SKIP
        >>> form.spec() == JobSpec(name="demo", script="train.py")                       # doctest: +SKIP
        True
    """

    def __init__(self, cluster: Cluster, spec: JobSpec | None = None) -> None:
        self.cluster = cluster
        self.job: Job | None = None
        self.panel: Any = None
        self.last_plan: Any = None
        self.filled_config: dict[str, Any] | None = None
        self.exported: tuple[Path, Path] | None = None
        self.problems: dict[str, InvalidSpecError] = {}
        self.recommended: list[advisor.Recommendation] = []
        self._loading = False
        self._launching = False
        self._last_launch: tuple[float, JobSpec] | None = None
        self._auto_export_path = ""
        self._available = advisor.available_here()
        self._profiles = {prof.key: prof for prof in advisor.all_profiles()}
        self.errors: dict[str, widgets.HTML] = {}
        # Secret env values typed into the form live here, not in the widget (whose state a notebook may save).
        self._secret_env: dict[str, str] = {}
        self._build()
        self.load(spec if spec is not None else JobSpec(name="my-job", script="train.py",
                                                          deepspeed={"train_micro_batch_size_per_gpu": 1}))

    # -- building the widgets ---------------------------------------------------------------
    def _error_label(self, key: str) -> widgets.HTML:
        label = widgets.HTML(value="", layout=widgets.Layout(margin="0 0 0 8px"))
        label.add_class("dsnb-error")
        label.add_class(f"dsnb-error-{key.replace('_', '-')}")
        self.errors[key] = label
        return label

    def _row(self, key: str, widget: widgets.Widget) -> widgets.HBox:
        widget.add_class(f"dsnb-field-{key.replace('_', '-')}")
        widget.style.description_width = _LABEL_WIDTH
        return widgets.HBox([widget, self._error_label(key)])

    def _build(self) -> None:
        W = widgets
        wide = W.Layout(width="420px")
        # What do you need?
        self.workload = W.ToggleButtons(options=[("batch", "batch"), ("serving", "serving")], description="Workload")
        self.multi_node = W.ToggleButtons(options=[("single node", False), ("multi-node", True)], description="Nodes")
        self.platform = W.Dropdown(
            options=[("any", "any"), ("my laptop / this machine", "laptop"), ("Kubernetes", "kubernetes"), ("Ray", "ray")],
            description="Platform",
        )
        for w in (self.workload, self.multi_node, self.platform):
            w.style.description_width = _LABEL_WIDTH
        self.recommendations = W.HTML(layout=W.Layout(max_height="150px", overflow="auto", flex="1 1 0", margin="0 0 0 12px"))
        self.recommendations.add_class("dsnb-recommendations")
        self.backend = W.Dropdown(options=self._backend_options(), description="Backend", layout=W.Layout(width="640px"))
        self.backend.style.description_width = _LABEL_WIDTH
        self.backend.add_class("dsnb-backend")
        self.backend_note = W.HTML()
        self.backend_note.add_class("dsnb-backend-note")
        self.cluster_label = W.HTML()
        self.cluster_label.add_class("dsnb-cluster")
        self.backend_options = BackendOptionsBox()
        self.backend_options.show(self.cluster.backend.name)
        self.connect_button = W.Button(description="Use these options", icon="plug",
                                       tooltip="Make the cluster again with the options above (empty fields keep the defaults)")
        self.connect_button.add_class("dsnb-connect")

        # Job fields.
        self.name = W.Text(description="Name", placeholder="my-job", layout=wide)
        self.script = W.Text(description="Script", placeholder="train.py (relative to the working dir)", layout=wide)
        self.command = W.Text(description="or command", placeholder="python -m my.module (instead of a script)", layout=wide)
        self.args = W.Text(description="Arguments", placeholder="--epochs 3 --lr 1e-4", layout=wide)
        self.working_dir = W.Text(description="Working dir", placeholder="(the current directory)", layout=wide)
        self.nodes = W.IntText(description="Nodes", value=1, layout=W.Layout(width="260px"))
        self.procs_per_node = W.IntText(description="Processes per node", value=1, layout=W.Layout(width="260px"))
        self.gpus = W.IntText(description="GPUs per node", value=0, layout=W.Layout(width="260px"))
        self.cpu = W.Text(description="CPUs per node", placeholder="e.g. 4 or 500m", layout=W.Layout(width="300px"))
        self.memory = W.Text(description="Memory per node", placeholder="e.g. 16Gi", layout=W.Layout(width="300px"))
        self.image = W.Text(description="Image", placeholder="container image (Kubernetes, KubeRay)", layout=wide)
        self.env = W.Textarea(description="Environment", placeholder="KEY=VALUE, one a line", layout=W.Layout(width="420px", height="60px"))
        self.timeout = W.Text(description="Timeout (s)", placeholder="none", layout=W.Layout(width="260px"))
        self.hang_timeout = W.Text(description="Hang timeout (s)", placeholder="none", layout=W.Layout(width="260px"),
                                   tooltip="Fail the job when a rank writes nothing this long while the others go on")
        self.max_restarts = W.IntText(description="Max restarts", value=0, layout=W.Layout(width="260px"))

        # DeepSpeed.
        self.use_deepspeed = W.Checkbox(description="DeepSpeed config", value=True, indent=False)
        self.use_deepspeed.add_class("dsnb-field-use-deepspeed")
        self.zero_stage = W.Dropdown(options=[0, 1, 2, 3], value=0, description="ZeRO stage")
        self.precision = W.Dropdown(options=list(PRECISIONS), value="fp32", description="Precision")
        self.micro_batch = W.IntText(description="Micro-batch per GPU", value=1, layout=W.Layout(width="260px"),
                                     tooltip="0: not set here (give train_batch_size in the extra JSON)")
        self.grad_accum = W.IntText(description="Grad. accumulation", value=1, layout=W.Layout(width="260px"))
        self.offload_optimizer = W.Dropdown(options=list(OFFLOAD_DEVICES), value="none", description="Optimizer offload")
        self.offload_param = W.Dropdown(options=list(OFFLOAD_DEVICES), value="none", description="Parameter offload")
        self.extra_config = W.Textarea(description="Extra config JSON", placeholder='{"steps_per_print": 10}  (merged in; the fields above win)',
                                       layout=W.Layout(width="420px", height="80px"))
        self.config_preview = W.HTML(layout=W.Layout(max_height="220px", overflow="auto"))
        self.config_preview.add_class("dsnb-config-preview")
        self.fit = FitView()
        for w in (self.fit.model, self.fit.sequence_length):
            w.style.description_width = _LABEL_WIDTH

        # Actions.
        self.export_path = W.Text(description="to", layout=W.Layout(width="360px"))
        self.export_path.style.description_width = "24px"
        self.export_path.add_class("dsnb-export-path")
        self.dryrun_button = W.Button(description="Dry run", icon="eye", tooltip="Show what Launch would do; creates nothing")
        self.launch_button = W.Button(description="Launch", icon="rocket", button_style="success", tooltip="Submit the job")
        self.export_button = W.Button(description="Export", icon="download", tooltip="Write the plan as YAML and the spec as JSON")
        for button, css in ((self.dryrun_button, "dsnb-dryrun"), (self.launch_button, "dsnb-launch"), (self.export_button, "dsnb-export")):
            button.add_class(css)
        self.message = W.HTML()
        self.message.add_class("dsnb-message")
        self.plan_view = W.HTML(layout=W.Layout(max_height="300px", overflow="auto"))
        self.plan_view.add_class("dsnb-plan")
        self.output = W.Output()
        self.output.add_class("dsnb-output")

        choices = W.VBox([self.workload, self.multi_node, self.platform])
        advice = W.VBox([
            W.HTML("<b>What do you need?</b>"), W.HBox([choices, self.recommendations]),
            self.backend, self.backend_note, self.backend_options.widget, self.connect_button, self.cluster_label,
        ])
        job_box = W.VBox([
            W.HTML("<b>Job</b>"),
            *(self._row(k, getattr(self, k)) for k in (
                "name", "script", "command", "args", "working_dir", "nodes", "procs_per_node", "gpus",
                "cpu", "memory", "image", "env", "timeout", "hang_timeout", "max_restarts")),
        ], layout=W.Layout(flex="1 1 0", min_width="420px"))
        ds_box = W.VBox([
            W.HTML("<b>DeepSpeed</b>"), self.use_deepspeed,
            *(self._row(k, getattr(self, k)) for k in (
                "zero_stage", "precision", "micro_batch", "grad_accum", "offload_optimizer", "offload_param", "extra_config")),
            W.HTML("Config the ranks get (batch sizes filled in):"), self.config_preview, *self.fit.children(),
        ], layout=W.Layout(flex="1 1 0", min_width="420px"))
        actions = W.VBox([
            W.HBox([self.dryrun_button, self.launch_button, self.export_button, self.export_path]),
            self._error_label("form"), self.message, self.plan_view, self.output,
        ])
        self.widget = W.VBox([advice, W.HBox([job_box, ds_box], layout=W.Layout(flex_flow="row wrap")), actions])
        self.widget.add_class("dsnb-form")

        for key in FIELD_KEYS:
            if key != "form":
                getattr(self, key).observe(self._on_change, names="value")
        self.env.observe(self._hide_secrets, names="value")
        self.use_deepspeed.observe(self._on_change, names="value")
        for w in (self.fit.model, self.fit.sequence_length):
            w.observe(self._on_change, names="value")
        self.nodes.observe(self._on_nodes, names="value")
        for w in (self.workload, self.multi_node, self.platform):
            w.observe(self._on_advice, names="value")
        self.backend.observe(self._on_backend, names="value")
        self.connect_button.on_click(self._on_connect)
        self.dryrun_button.on_click(self._on_dryrun)
        self.launch_button.on_click(self._on_launch)
        self.export_button.on_click(self._on_export)

    def _backend_options(self) -> list[tuple[str, str]]:
        options = []
        for prof in self._profiles.values():
            label = prof.summary()
            if prof.backend not in self._available:
                label += " — not available here"
            options.append((label, prof.key))
        current = self.cluster.backend.name
        if not advisor.profiles_for_backend(current):
            options.append((f"{current} — a plugin backend", current))
        return options

    def _current_backend_key(self) -> str:
        current = self.cluster.backend.name
        matches = advisor.profiles_for_backend(current)
        if not matches:
            return current
        for prof in matches:
            if self.workload.value in prof.workloads:
                return prof.key
        return matches[0].key

    # -- filling and reading ----------------------------------------------------------------
    def load(self, spec: JobSpec) -> None:
        """Fill every field from ``spec``; afterwards ``form.spec() == spec``.

        Args:
            spec: a valid spec.

        Raises:
            TypeError: ``spec`` is not a JobSpec, or it calls a function, which the form has no field for.

        Example:
            >>> form.load(JobSpec(name="tiny-gpt", script="train.py", procs_per_node=2))  # doctest: +SKIP
            >>> form.procs_per_node.value                                                # doctest: +SKIP
            2
        """
        if not isinstance(spec, JobSpec):
            raise TypeError(f"load() takes a JobSpec, got {type(spec).__name__}")
        if spec.function is not None:
            raise TypeError(f"the form runs a script or a command; {spec.function.name} is a function job: "  # type: ignore[union-attr]
                            "submit it with cluster.submit(spec)")
        self._loading = True
        try:
            self.name.value = spec.name
            self.script.value = spec.script or ""
            self.command.value = shlex.join(spec.command) if spec.command else ""
            self.args.value = shlex.join(spec.args)
            self.working_dir.value = spec.working_dir or ""
            self.nodes.value = spec.nodes
            self.procs_per_node.value = spec.procs_per_node
            self.gpus.value = spec.resources.gpus
            self.cpu.value = "" if spec.resources.cpu is None else str(spec.resources.cpu)
            self.memory.value = spec.resources.memory or ""
            self.image.value = spec.image or ""
            self.env.value = format_env(spec.env)  # secret values move to the form's memory (_hide_secrets)
            self.timeout.value = "" if spec.timeout is None else str(spec.timeout)
            self.hang_timeout.value = "" if spec.hang_timeout is None else str(spec.hang_timeout)
            self.max_restarts.value = spec.max_restarts
            config = spec.deepspeed if isinstance(spec.deepspeed, dict) else spec.deepspeed_config
            self.use_deepspeed.value = config is not None
            fields, extra = split_deepspeed(config or {"train_micro_batch_size_per_gpu": 1})
            for key, value in fields.items():
                getattr(self, key).value = value
            self.extra_config.value = json.dumps(extra, indent=2) if extra else ""
            self.multi_node.value = spec.nodes > 1
            self.backend.value = self._current_backend_key()
        finally:
            self._loading = False
        self._refresh()
        self._refresh_advice()
        self._refresh_backend_note()

    def _deepspeed(self) -> tuple[dict[str, Any] | None, dict[str, InvalidSpecError]]:
        """The DeepSpeed config of the fields, and parse errors of the extra JSON."""
        if not self.use_deepspeed.value:
            return None, {}
        config = structured_deepspeed(
            self.micro_batch.value, self.grad_accum.value, self.zero_stage.value, self.precision.value,
            self.offload_optimizer.value, self.offload_param.value,
        )
        text = self.extra_config.value.strip()
        if not text:
            return config, {}
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as e:
            return config, {"extra_config": InvalidSpecError(
                "deepspeed.extra", f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", "fix the JSON, or clear it")}
        if not isinstance(extra, dict):
            return config, {"extra_config": InvalidSpecError(
                "deepspeed.extra", f"must be a JSON object, got {type(extra).__name__}", 'write it like {"steps_per_print": 10}')}
        return merge_config(extra, config), {}

    def _field_values(self) -> tuple[dict[str, Any], dict[str, InvalidSpecError]]:
        """The JobSpec arguments the fields stand for, and the fields whose text does not parse.

        A field that does not parse stands for a value that is valid on its own (no arguments,
        no env, no DeepSpeed config), so that the spec's own checks still see every other field.
        """
        problems: dict[str, InvalidSpecError] = {}

        def parse(key: str, fn: Any, fallback: Any) -> Any:
            try:
                return fn()
            except InvalidSpecError as e:
                problems.setdefault(key, e)
                return fallback

        command_text = self.command.value.strip()
        # A command that does not split still counts as one, so "exactly one of script or command" is checked.
        command = parse("command", lambda: _split(command_text, "command"), ["placeholder"]) if command_text else None
        cpu_text = self.cpu.value.strip()
        deepspeed, ds_problems = self._deepspeed()
        problems.update(ds_problems)
        values: dict[str, Any] = {
            "name": self.name.value.strip(),
            "script": self.script.value.strip() or None,
            "command": command or None,
            "args": parse("args", lambda: _split(self.args.value, "args"), []),
            "working_dir": self.working_dir.value.strip() or None,
            "nodes": self.nodes.value,
            "procs_per_node": self.procs_per_node.value,
            "resources": {"gpus": self.gpus.value, "cpu": _parse_number(cpu_text) if cpu_text else None,
                          "memory": self.memory.value.strip() or None},
            "image": self.image.value.strip() or None,
            "env": parse("env", self._env, {}),
            "timeout": parse("timeout", lambda: _parse_timeout(self.timeout.value), None),
            "hang_timeout": parse("hang_timeout", lambda: _parse_timeout(self.hang_timeout.value, "hang_timeout"), None),
            "max_restarts": self.max_restarts.value,
            "deepspeed": deepspeed if not ds_problems else None,
        }
        return values, problems

    def _filled_config(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """The DeepSpeed config the ranks would get, shown while other fields still have problems."""
        nodes, procs = values["nodes"], values["procs_per_node"]
        if values["deepspeed"] is None or nodes < 1 or procs < 1:
            return None
        try:
            return check_deepspeed_config(values["deepspeed"], nodes * procs)
        except InvalidSpecError:
            return None  # JobSpec.problems reports it beside its field

    def _evaluate(self) -> tuple[JobSpec | None, dict[str, InvalidSpecError], dict[str, Any] | None]:
        """Check the fields once: (the spec or None, every problem by field key, the filled DeepSpeed config)."""
        values, problems = self._field_values()
        for problem in JobSpec.problems(**values):
            problems.setdefault(field_key(problem.field), problem.error())
        spec = JobSpec(**values) if not problems else None
        return spec, problems, self._filled_config(values)

    def spec(self) -> JobSpec:
        """The JobSpec the fields describe.

        Raises:
            InvalidSpecError: a field is invalid (the first one, in the order of the form).

        Example:
            >>> form.spec().name  # doctest: +SKIP
            'my-job'
        """
        spec, problems, _ = self._evaluate()
        if spec is None:
            first = min(problems, key=FIELD_KEYS.index)
            raise problems[first]
        return spec

    # -- live updates -----------------------------------------------------------------------
    def _hide_secrets(self, _change: Any = None) -> None:
        """Move every secret env value (by name, by look, or a :class:`~dsnb.secrets.Secret`) out of the
        widget into the form's memory, leaving ``KEY=***`` on screen (and in any saved widget state)."""
        try:
            typed = parse_env(self.env.value)
        except InvalidSpecError:
            return  # shown as a problem; nothing to hide until it parses
        hidden = {k: v for k, v in typed.items() if v != REDACTED and is_secret(k, v)}
        if hidden:
            self._secret_env.update(hidden)
            self.env.value = format_env({k: (REDACTED if k in hidden else v) for k, v in typed.items()})

    def _env(self) -> dict[str, str]:
        """The env the form stands for: ``KEY=***`` lines take the value the form keeps for KEY.

        Raises:
            InvalidSpecError: a line that does not parse, or ``KEY=***`` for a value the form never saw.
        """
        env: dict[str, str] = {}
        for key, value in parse_env(self.env.value).items():
            if value == REDACTED:
                if key not in self._secret_env:
                    raise InvalidSpecError(f"env.{key}", "is *** but its value was never typed here", f"type {key}=<its value> again")
                env[key] = Secret(self._secret_env[key])
            else:
                env[key] = value
        return env

    def _on_change(self, _change: Any = None) -> None:
        if not self._loading:
            self._refresh()

    def _refresh(self) -> JobSpec | None:
        spec, problems, filled = self._evaluate()
        self.problems = problems
        self.filled_config = filled
        self._show_problems(problems)
        ds_on = self.use_deepspeed.value
        for key in ("zero_stage", "precision", "micro_batch", "grad_accum", "offload_optimizer", "offload_param", "extra_config"):
            getattr(self, key).disabled = not ds_on
        if not ds_on:
            self.config_preview.value = "<i>no DeepSpeed config: the script configures DeepSpeed itself</i>"
        elif filled is not None:
            later = framework_filled(filled)
            note = (f"<div class='dsnb-framework-filled'>Left <code>\"auto\"</code> for the Trainer or Accelerate to fill "
                    f"at run time: {html.escape(', '.join(later))}</div>") if later else ""
            self.config_preview.value = note + _pre(json.dumps(filled, indent=2))
        else:
            self.config_preview.value = "<i>fix the fields marked above to see the config</i>"
        self.launch_button.disabled = spec is None or self._launching
        self.fit.update(self.cluster.backend, spec)
        name = self.name.value.strip() or "job"
        if self.export_path.value in ("", self._auto_export_path):
            self._auto_export_path = f"{name}.yaml"
            self.export_path.value = self._auto_export_path
        return spec

    def _show_problems(self, problems: dict[str, InvalidSpecError]) -> None:
        for key, label in self.errors.items():
            error = problems.get(key)
            label.value = _error_html(error) if error is not None else ""

    def _on_nodes(self, change: Any) -> None:
        if not self._loading and isinstance(change["new"], int) and change["new"] >= 1:
            self.multi_node.value = change["new"] > 1

    def _on_advice(self, _change: Any = None) -> None:
        if not self._loading:
            self._refresh_advice()

    def _refresh_advice(self) -> None:
        platform = None if self.platform.value == "any" else self.platform.value
        self.recommended = advisor.recommend(self.workload.value, self.multi_node.value, platform, self._available)
        items = "".join(
            f"<li><b>{html.escape(r.profile.label)}</b> — ease {r.score}/5: {html.escape(r.reason)}"
            + (f" <i style='color:#a15c00'>{html.escape(r.status_text())}</i>" if not r.available else "")
            + "</li>"
            for r in self.recommended
        )
        head = html.escape(advisor.headline(self.recommended))
        self.recommendations.value = f"<div><b>{head}</b><ol style='margin:2px 0'>{items}</ol></div>"

    def _on_backend(self, change: Any) -> None:
        if self._loading:
            return
        target = self._target_backend()
        self.backend_options.show(target)
        if target != self.cluster.backend.name and target in self._available:
            self._switch(target, {})
            return
        self._refresh_backend_note()

    def _target_backend(self) -> str:
        prof = self._profiles.get(self.backend.value)
        return prof.backend if prof is not None else self.backend.value

    def _on_connect(self, _button: Any = None) -> None:
        """Make the cluster again for the chosen backend, with the options filled in."""
        target = self._target_backend()
        if target not in self._available:
            self._refresh_backend_note(f"{target!r} cannot run in this install (dsnb check --backend {target} says why)")
            return
        try:
            options = self.backend_options.values()
        except InvalidSpecError as e:
            self._refresh_backend_note(str(e))
            return
        self._switch(target, options)

    def _switch(self, target: str, options: dict[str, Any]) -> None:
        from dsnb.cluster import Cluster

        try:
            self.cluster = Cluster(target, **options)
        except Exception as e:  # shown to the person; the form keeps its cluster
            self._refresh_backend_note(f"Could not switch to {target!r}: {e}")
            return
        self.last_plan = None
        self.plan_view.value = ""
        self._refresh()
        self._refresh_backend_note()

    def _refresh_backend_note(self, problem: str = "") -> None:
        current = self.cluster.backend.name
        self.cluster_label.value = f"Dry run and Launch use: <code>{html.escape(repr(self.cluster), quote=False)}</code>"
        key = self.backend.value
        prof = self._profiles.get(key)
        if problem:
            note = f"<span style='color:#b00020'>{html.escape(problem)}</span>"
        elif prof is None:
            note = f"Plugin backend {html.escape(key)!s}."
        elif prof.backend == current:
            note = f"{html.escape(prof.label)}: {html.escape(prof.suits)}."
            if prof.needs:
                note += f" Needs {html.escape(', '.join(prof.needs))}."
        else:
            note = (
                f"<span style='color:#a15c00'>{html.escape(advisor.how_to_enable(prof, self._available), quote=False)}</span> "
                f"Dry run and Launch stay on <code>{html.escape(current)}</code>."
            )
        self.backend_note.value = note

    # -- actions ----------------------------------------------------------------------------
    def _say(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#1b5e20"
        self.message.value = f"<span style='color:{color}'>{html.escape(text, quote=False)}</span>"

    def _spec_or_say(self) -> JobSpec | None:
        try:
            return self.spec()
        except InvalidSpecError as e:
            self._say(f"Not ready: {e}", error=True)
            return None

    def _show_backend_error(self, error: Exception, action: str) -> None:
        # Shown next to its field until the next edit; not kept in self.problems, so Launch stays
        # enabled for a retry once, say, the missing script file has been written.
        if isinstance(error, InvalidSpecError):
            self.errors[field_key(error.field)].value = _error_html(error)
        self._say(f"{action} failed: {error}", error=True)

    def _on_dryrun(self, _button: Any = None) -> None:
        spec = self._spec_or_say()
        if spec is None:
            return
        try:
            plan = self.cluster.dryrun(spec)
        except Exception as e:  # every failure is shown in the form, not lost in the kernel log
            self._show_backend_error(e, "Dry run")
            return
        self.last_plan = plan
        self.plan_view.value = _pre(str(plan))
        self._say(f"Dry run of {plan.name} on {plan.backend}: nothing was created.")

    def _on_launch(self, _button: Any = None) -> None:
        if self._launching:
            return
        spec = self._spec_or_say()
        if spec is None:
            return
        # A click queued while the previous submit ran arrives right after it: drop that one.
        if self._last_launch is not None:
            when, previous = self._last_launch
            if previous == spec and time.monotonic() - when < _DOUBLE_CLICK_S:
                self._say(f"Just launched {self.job.name if self.job else 'it'}; not launching the same job twice.")
                return
        self._launching = True
        self.launch_button.disabled = True
        try:
            job = self.cluster.submit(spec)
        except Exception as e:  # every failure is shown in the form, not lost in the kernel log
            self._show_backend_error(e, "Launch")
            return
        finally:
            self._launching = False
            self.launch_button.disabled = bool(self.problems)
        self._last_launch = (time.monotonic(), spec)
        self.job = job
        self._say(f"Launched {job.name} on {self.cluster.backend.name}.")
        self._show_job(job)

    def _show_job(self, job: Job) -> None:
        old = self.panel
        try:
            # The job's cached panel: displaying form.job later shows this same panel.
            self.panel = panel_for(job)
        except Exception as e:  # the job runs anyway; show it plainly
            self._say(f"Launched {job.name}; its live panel failed to start: {e}", error=True)
            self.panel = job
        if old is not None and old is not self.panel and hasattr(old, "close"):
            old.close()
        self.output.outputs = (_bundle_of(self.panel),)

    def _on_export(self, _button: Any = None) -> None:
        spec = self._spec_or_say()
        if spec is None:
            return
        text = self.export_path.value.strip() or f"{spec.name}.yaml"
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        spec_path = path.with_suffix(".spec.json")
        try:
            plan = self.cluster.dryrun(spec)
            data = spec.to_dict()
            data["env"] = redact_env(data["env"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(plan.to_yaml())
            spec_path.write_text(json.dumps(data, indent=2) + "\n")
        except Exception as e:  # every failure is shown in the form, not lost in the kernel log
            self._show_backend_error(e, "Export")
            return
        self.last_plan = plan
        self.exported = (path, spec_path)
        hidden = " (secret-looking env values written as ***)" if data["env"] != spec.env else ""
        self._say(f"Wrote {path} (plan) and {spec_path} (spec){hidden}.")

    # -- display ----------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict) and "text/plain" in bundle:
            bundle = {**bundle, "text/plain": repr(self)}
        return bundle

    def close(self) -> None:
        """Close the form's widgets (and the job panel, if it has one); jobs keep running."""
        if self.panel is not None and hasattr(self.panel, "close"):
            self.panel.close()
        stack: list[widgets.Widget] = [self.widget]
        while stack:
            w = stack.pop()
            stack.extend(getattr(w, "children", ()))
            w.close()

    def __repr__(self) -> str:
        return f"LaunchForm(cluster={self.cluster!r}, name={self.name.value!r})"
