"""What each backend is like to use and what it suits, as data the advisor ranks.

A backend declares its profiles in its ``profiles`` class attribute (one backend may have two:
Ray Train and Ray Serve); the built-in backends' are kept in this module too, so that the
advisor can rank every backend without importing any of them (and kubernetes or ray with
them). ``score`` rates ease of use and flexibility from 1 (you wire a lot yourself) to 5 (it
mostly just works), from running the same DeepSpeed job on each backend (docs/notebooks.md).

Example:
    >>> [p.key for p in BUILTIN_PROFILES["ray"]]
    ['ray-train', 'ray-serve']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Workload = Literal["batch", "serving"]
Platform = Literal["laptop", "kubernetes", "ray"]
NodeSpan = Literal["single", "multi", "single+multi"]

WORKLOADS: tuple[Workload, ...] = ("batch", "serving")
PLATFORMS: tuple[Platform, ...] = ("laptop", "kubernetes", "ray")


@dataclass(frozen=True)
class BackendProfile:
    """What one backend is like to use, and what it suits.

    Attributes:
        key: unique profile name, e.g. ``"ray-train"`` (one backend may have two profiles).
        backend: the registry name ``Cluster(...)`` takes, e.g. ``"ray"``.
        label: a short human name, e.g. ``"Ray Train"``.
        score: ease of use and flexibility, 1 (low) to 5 (high).
        workloads: what it runs today: ``"batch"`` and/or ``"serving"``.
        node_span: ``"single"``, ``"multi"`` or ``"single+multi"`` nodes.
        needs: what must exist before it can run a job.
        suits: one line on what it is good for.
        platforms: where it belongs (its first choice), e.g. ``("kubernetes",)``.
        also_on: where it also runs, as a second choice (Ray on a laptop runs a local Ray).
        multi_node_score: the score when the job spans several nodes, if that differs.
        emulated_multi_node: several "nodes" run as processes on one machine.
        extra: the ``dsnb[...]`` extra that installs its Python dependencies.

    Raises:
        ValueError: a score outside 1–5, an unknown workload or platform.

    Example:
        >>> BackendProfile(key="mine", backend="mine", label="Mine", score=4, workloads=("batch",),
        ...                node_span="single", needs=(), suits="one node", platforms=("laptop",)).summary()
        'Mine — ease 4/5 — batch, 1 node'
    """

    key: str
    backend: str
    label: str
    score: int
    workloads: tuple[Workload, ...]
    node_span: NodeSpan
    needs: tuple[str, ...]
    suits: str
    platforms: tuple[Platform, ...]
    also_on: tuple[Platform, ...] = ()
    multi_node_score: int | None = None
    emulated_multi_node: bool = False
    extra: str | None = None

    def __post_init__(self) -> None:
        for value in (self.score, self.multi_node_score):
            if value is not None and not 1 <= value <= 5:
                raise ValueError(f"profile {self.key!r}: score {value} is outside 1..5")
        for workload in self.workloads:
            if workload not in WORKLOADS:
                raise ValueError(f"profile {self.key!r}: unknown workload {workload!r}")
        for platform in (*self.platforms, *self.also_on):
            if platform not in PLATFORMS:
                raise ValueError(f"profile {self.key!r}: unknown platform {platform!r}")

    @property
    def single_node(self) -> bool:
        """Whether it runs a job on one node."""
        return self.node_span in ("single", "single+multi")

    @property
    def multi_node(self) -> bool:
        """Whether it runs a job over several nodes (really, or emulated on one machine)."""
        return self.node_span in ("multi", "single+multi")

    def score_for(self, multi_node: bool) -> int:
        """The score for a job on one node, or spread over several.

        Example:
            >>> serve = BUILTIN_PROFILES["ray"][1]
            >>> serve.score_for(False), serve.score_for(True)
            (5, 2)
        """
        if multi_node and self.multi_node_score is not None:
            return self.multi_node_score
        return self.score

    def fits(self, workload: Workload, multi_node: bool) -> bool:
        """Whether it runs this workload over this many nodes today.

        Example:
            >>> BUILTIN_PROFILES["mpijob"][0].fits("batch", multi_node=False)
            False
        """
        return workload in self.workloads and (self.multi_node if multi_node else self.single_node)

    def runs_on(self, platform: Platform) -> bool:
        """Whether it runs on ``platform`` at all (first or second choice).

        Example:
            >>> BUILTIN_PROFILES["ray"][0].runs_on("laptop"), BUILTIN_PROFILES["trainjob"][0].runs_on("laptop")
            (True, False)
        """
        return platform in self.platforms or platform in self.also_on

    def span_text(self) -> str:
        """The nodes it spans.

        Example:
            >>> BUILTIN_PROFILES["mpijob"][0].span_text(), BUILTIN_PROFILES["local"][0].span_text()
            ('2..n nodes', '1 node (n emulated)')
        """
        if self.emulated_multi_node:
            return "1 node (n emulated)"
        return {"single": "1 node", "multi": "2..n nodes", "single+multi": "1..n nodes"}[self.node_span]

    def score_text(self) -> str:
        """The score as shown to a person, e.g. ``"ease 5/5"`` or ``"ease 5/5 (2/5 across nodes)"``."""
        text = f"ease {self.score}/5"
        if self.multi_node_score is not None and self.multi_node_score != self.score:
            text += f" ({self.multi_node_score}/5 across nodes)"
        return text

    def summary(self) -> str:
        """One line: label, score, workloads and node span.

        Example:
            >>> BUILTIN_PROFILES["ray"][0].summary()
            'Ray Train — ease 5/5 — batch, 1..n nodes'
        """
        return f"{self.label} — {self.score_text()} — {'/'.join(self.workloads)}, {self.span_text()}"


_NAMESPACE = "a Kubernetes namespace"

BUILTIN_PROFILES: dict[str, tuple[BackendProfile, ...]] = {
    "local": (
        BackendProfile(
            key="local", backend="local", label="Local", score=5, multi_node_score=1,
            workloads=("batch", "serving"), node_span="single+multi", emulated_multi_node=True, needs=(),
            suits="trying a job or a model server on this machine with nothing to install; several nodes are "
                  "emulated as processes here, so it never scales past this machine",
            platforms=("laptop",)),
    ),
    "ray": (
        BackendProfile(
            key="ray-train", backend="ray", label="Ray Train", score=5, workloads=("batch",),
            node_span="single+multi", needs=("a Ray cluster or local Ray",),
            suits="training from one node to many with the least wiring; Ray places the ranks and restarts them",
            platforms=("ray",), also_on=("laptop",), extra="ray"),
        BackendProfile(
            key="ray-serve", backend="ray", label="Ray Serve", score=5, multi_node_score=2, workloads=("serving",),
            node_span="single+multi", needs=("a Ray cluster or local Ray",),
            suits="serving a model that fits one node, with replicas and autoscaling; a model spread "
                  "over several nodes takes hand-made placement",
            platforms=("ray",), also_on=("laptop",), extra="ray"),
    ),
    "kuberay": (
        BackendProfile(
            key="kuberay-train", backend="kuberay", label="KubeRay (RayJob)", score=4, workloads=("batch",),
            node_span="single+multi", needs=(_NAMESPACE, "the KubeRay operator installed"),
            suits="Ray Train on Kubernetes: each job gets its own Ray cluster, gone when the job ends",
            platforms=("kubernetes",), extra="k8s"),
        BackendProfile(
            key="kuberay-serve", backend="kuberay", label="KubeRay (RayService)", score=4, multi_node_score=2,
            workloads=("serving",), node_span="single+multi", needs=(_NAMESPACE, "the KubeRay operator installed"),
            suits="Ray Serve on Kubernetes, with replicas and autoscaling, for a model that fits one node",
            platforms=("kubernetes",), extra="k8s"),
    ),
    "trainjob": (
        BackendProfile(
            key="trainjob", backend="trainjob", label="Kubeflow Trainer", score=3, workloads=("batch", "serving"),
            node_span="single+multi", needs=(_NAMESPACE, "Kubeflow Trainer installed"),
            suits="Kubernetes clusters that already run Kubeflow: the deepspeed-distributed runtime does the wiring",
            platforms=("kubernetes",), extra="k8s"),
    ),
    "mpijob": (
        BackendProfile(
            key="mpijob", backend="mpijob", label="MPI Operator", score=2, workloads=("batch", "serving"),
            node_span="multi", needs=(_NAMESPACE, "the MPI Operator installed"),
            suits="multi-node runs on Kubernetes clusters with the MPI Operator: mpirun over the operator's hostfile and ssh",
            platforms=("kubernetes",), extra="k8s"),
    ),
    "statefulset": (
        BackendProfile(
            key="statefulset", backend="statefulset", label="StatefulSet + Service", score=1,
            workloads=("batch", "serving"), node_span="single+multi", needs=(_NAMESPACE,),
            suits="any Kubernetes cluster with no operator to install; dsnb does the rank wiring itself",
            platforms=("kubernetes",), extra="k8s"),
    ),
}
