"""The :class:`Cluster` facade: one object to launch, find and stop jobs on any backend.

Example:
    >>> from dsnb import Cluster, JobSpec
    >>> cluster = Cluster()                      # the local backend: this machine
    >>> plan = cluster.dryrun(JobSpec(name="hello", command=["python", "-c", "print(1)"]))
    >>> plan.backend
    'local'
"""

from __future__ import annotations

from typing import Any

from dsnb.backends.base import Backend, Plan, load_backend, resolve_name
from dsnb.errors import ClusterError, JobFailed
from dsnb.job import Job
from dsnb.preflight import PreflightReport
from dsnb.serving.endpoint import Endpoint
from dsnb.serving.spec import ServeSpec
from dsnb.spec import JobSpec
from dsnb.status import JobStatus


class Cluster:
    """A thin dispatcher over one backend.

    Args:
        backend: a registered backend name (``"local"`` by default), or a Backend instance.
        **options: passed to the backend's constructor (e.g. ``home=`` for local).

    Raises:
        BackendUnavailable: unknown backend, or its optional dependencies are missing.

    Example:
        >>> Cluster("local")
        Cluster(backend='local')
    """

    def __init__(self, backend: str | Backend = "local", **options: Any) -> None:
        if isinstance(backend, Backend):
            if options:
                raise TypeError("options go to the backend's constructor; pass a name, not an instance")
            self.backend = backend
        else:
            name, options = resolve_name(backend, options)
            self.backend = load_backend(name)(**options)

    def dryrun(self, spec: JobSpec | ServeSpec) -> Plan:
        """What ``submit`` (a JobSpec) or ``serve`` (a ServeSpec) would do; nothing is started or created.

        ``print(plan)`` shows it; ``plan.to_yaml()`` is what to hand a platform team.

        Raises:
            InvalidSpecError: the spec cannot run on this backend.
            ClusterError: a ServeSpec on a backend that does not serve.
        """
        if isinstance(spec, ServeSpec):
            return self.backend.serve_plan(spec)
        return self.backend.dryrun(spec)

    def submit(self, spec: JobSpec) -> Job:
        """Start ``spec`` under a unique name and return its handle.

        Raises:
            InvalidSpecError: the spec cannot run on this backend; nothing was started.
            DsnbError: the backend refused the job.

        Example:
            >>> job = Cluster().submit(spec)  # doctest: +SKIP
            >>> job.name                       # doctest: +SKIP
            'tiny-gpt-x7k2'
        """
        return Job(self.backend, self.backend.submit(spec))

    def serve(self, spec: ServeSpec, wait: float | None = 600) -> Endpoint:
        """Deploy ``spec`` under a unique name and return its endpoint, ready to answer.

        On ``local`` and Kubernetes every rank of ``nodes × procs_per_node`` runs
        ``python -m dsnb.runtime.server`` and rank 0 answers; on Ray, Ray Serve runs ``replicas``
        copies (see ``docs/serving.md``).

        Args:
            spec: the model, ranks or replicas, and resources.
            wait: seconds to wait until the server is ready; None or 0 returns at once
                (then ``endpoint.wait()``).

        Raises:
            InvalidSpecError: the spec cannot be served here; nothing was deployed.
            ClusterError: this backend does not serve, or it refused the deployment.
            JobFailed: the deployment failed while waiting (e.g. the loader raised); it is removed.
            WaitTimeout: not ready within ``wait`` seconds; it keeps starting.

        Example:
            >>> endpoint = Cluster().serve(ServeSpec(name="tiny", model="models:build"))   # doctest: +SKIP
            >>> endpoint.predict({"inputs": [[0.0, 1.0, 2.0, 3.0]]})                      # doctest: +SKIP
            {'outputs': [[0.12, -0.4]]}
        """
        plan = self.backend.serve_plan(spec)
        self.backend.apply_serve(plan)
        endpoint = Endpoint(self.backend, plan.name)
        if wait:
            try:
                endpoint.wait(timeout=wait)
            except JobFailed:
                endpoint.stop()
                raise
        return endpoint

    def endpoint(self, name: str) -> Endpoint:
        """A handle on an existing endpoint, e.g. after a kernel restart.

        Raises:
            JobNotFound: no endpoint of that name.
        """
        self.backend.endpoint_status(name)
        return Endpoint(self.backend, name)

    def endpoints(self) -> list[JobStatus]:
        """Statuses of this backend's endpoints (none where it cannot serve)."""
        return self.backend.endpoints()

    def check(self, spec: JobSpec | None = None, *, model: Any = None, sequence_length: int | None = None) -> PreflightReport:
        """Check now that this backend can run jobs, and ``spec`` in particular; start nothing.

        What is checked depends on the backend (see ``docs/preflight.md``): on Kubernetes the
        API, the namespace, every permission dsnb needs and, for a GPU spec, GPU nodes; locally
        torch, deepspeed, CPU cores and GPUs. In a notebook the report shows as a table.

        Given ``model`` (a parameter count, a Hugging Face model directory or config, a module or a
        loader), a last ``memory fit`` line says whether it trains under ``spec``'s ZeRO stage,
        offload settings and world size on the memory there is (``docs/fit.md``); ``report.fit``
        holds the estimate.

        Args:
            spec: the job to check for.
            model: the model to estimate the memory of (see :func:`dsnb.fit.estimate`).
            sequence_length: tokens per sample, for the activations.

        Raises:
            Nothing on purpose: problems are failed lines; ``.raise_for_problems()`` raises
            a ClusterError for the first one.

        Example:
            >>> report = Cluster().check()
            >>> [r.name for r in report.results]
            ['torch', 'deepspeed', 'CPU cores']
            >>> print(report)                  # doctest: +SKIP
            ✓ torch: torch 2.4.0
            ✓ deepspeed: deepspeed 0.16.2
            ✓ CPU cores: 16 usable for 1 rank(s)
            >>> Cluster("statefulset", namespace="ml").check(spec).raise_for_problems()  # doctest: +SKIP
            >>> print(Cluster().check(spec, model=7e9)["memory fit"])  # doctest: +SKIP
            ✗ memory fit: 130.39 GiB per GPU, 234.69 GiB CPU per node (ZeRO 0); there is 23.47 GiB per GPU, ...
        """
        report = self.backend.check(spec)
        if model is not None:
            from dsnb.fit import fit_check

            line, report.fit = fit_check(model, spec, self.backend.memory_there(spec), sequence_length)
            report.results.append(line)
        return report

    def runtimes(self) -> list[dict[str, Any]]:
        """The Kubeflow Trainer runtimes a TrainJob here can name (``Cluster("trainjob")`` only).

        Each is a dict: ``name``, ``kind`` (``ClusterTrainingRuntime`` or ``TrainingRuntime``),
        ``framework`` (its ``trainer.kubeflow.org/framework`` label), ``policy`` (``"mpi"`` or
        ``"torch"``) and ``num_nodes``. ClusterTrainingRuntimes the user may not list are left out.

        Raises:
            ClusterError: this backend has no training runtimes, or the API refused to list
                the namespace's TrainingRuntimes.

        Example:
            >>> Cluster("trainjob", namespace="ml").runtimes()  # doctest: +SKIP
            [{'name': 'deepspeed-distributed', 'kind': 'ClusterTrainingRuntime', 'framework': 'deepspeed', 'policy': 'mpi', 'num_nodes': 1}]
            >>> Cluster("local").runtimes()  # doctest: +SKIP
            Traceback (most recent call last):
            dsnb.errors.ClusterError: backend 'local': has no training runtimes. Fix: ...
        """
        runtimes = getattr(self.backend, "runtimes", None)
        if not callable(runtimes):
            raise ClusterError(f"backend {self.backend.name!r}", "has no training runtimes",
                               "training runtimes belong to Kubeflow Trainer: list them with "
                               "Cluster('trainjob', namespace=...).runtimes()")
        return runtimes()

    def jobs(self) -> list[JobStatus]:
        """Statuses of this backend's jobs, newest first."""
        return self.backend.jobs()

    def attach(self, name: str) -> Job:
        """A handle on an existing job, e.g. after a kernel restart.

        Raises:
            JobNotFound: no job of that name.
        """
        self.backend.status(name)  # raises JobNotFound early
        return Job(self.backend, name)

    def form(self, spec: JobSpec | None = None) -> Any:
        """A launch form (ipywidgets) for this cluster, optionally filled from ``spec``.

        Raises:
            BackendUnavailable: ipywidgets is not installed (``pip install 'dsnb[notebook]'``).

        Example:
            >>> Cluster().form()  # doctest: +SKIP
        """
        from dsnb.widgets.form import LaunchForm

        return LaunchForm(self, spec=spec)

    def _ipython_display_(self) -> None:
        """Show the cluster's jobs in a notebook (a static table where ipywidgets is absent)."""
        from dsnb.widgets.display import display_cluster

        display_cluster(self)

    def close(self) -> None:
        """Release the backend's clients; running jobs keep running."""
        self.backend.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cluster(backend={self.backend.name!r})"
