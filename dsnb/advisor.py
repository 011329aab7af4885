"""Which backend fits a job: profiles of every backend and a ranked recommendation.

The table comes from running the same DeepSpeed job on each backend. ``score`` rates ease of
use and flexibility from 1 (you wire a lot yourself) to 5 (it mostly just works), for what
the backend suits. :func:`recommend` ranks the profiles that fit a request and marks the
ones this install of dsnb cannot run yet, so a view can say "recommended: X (not available
here yet: falls back to local)". Nothing here imports a UI toolkit.

Example:
    >>> best = recommend("batch", multi_node=False, platform="laptop", available={"local"})[0]
    >>> best.profile.label, best.available
    ('Local', True)
    >>> profile("ray-serve").score_for(multi_node=True)
    2
"""

from __future__ import annotations

from collections.abc import Iterable
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
        planned: workloads that are planned but not there yet.
        extra: the ``dsnb[...]`` extra that installs its Python dependencies.

    Raises:
        ValueError: a score outside 1–5, an unknown workload or platform.

    Example:
        >>> profile("local").span_text()
        '1 node (n emulated)'
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
    planned: tuple[Workload, ...] = ()
    extra: str | None = None

    def __post_init__(self) -> None:
        for value in (self.score, self.multi_node_score):
            if value is not None and not 1 <= value <= 5:
                raise ValueError(f"profile {self.key!r}: score {value} is outside 1..5")
        for workload in (*self.workloads, *self.planned):
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
            >>> profile("ray-serve").score_for(False), profile("ray-serve").score_for(True)
            (5, 2)
        """
        if multi_node and self.multi_node_score is not None:
            return self.multi_node_score
        return self.score

    def fits(self, workload: Workload, multi_node: bool) -> bool:
        """Whether it runs this workload over this many nodes today.

        Example:
            >>> profile("mpijob").fits("batch", multi_node=False)
            False
        """
        return workload in self.workloads and (self.multi_node if multi_node else self.single_node)

    def runs_on(self, platform: Platform) -> bool:
        """Whether it runs on ``platform`` at all (first or second choice).

        Example:
            >>> profile("ray-train").runs_on("laptop"), profile("trainjob").runs_on("laptop")
            (True, False)
        """
        return platform in self.platforms or platform in self.also_on

    def span_text(self) -> str:
        """The nodes it spans.

        Example:
            >>> profile("mpijob").span_text()
            '2..n nodes'
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
            >>> profile("ray-train").summary()
            'Ray Train — ease 5/5 — batch, 1..n nodes'
        """
        return f"{self.label} — {self.score_text()} — {'/'.join(self.workloads)}, {self.span_text()}"


#: Every backend profile, in the order they are listed.
PROFILES: tuple[BackendProfile, ...] = (
    BackendProfile(
        key="local",
        backend="local",
        label="Local",
        score=5,
        multi_node_score=1,
        workloads=("batch",),
        planned=("serving",),
        node_span="single+multi",
        emulated_multi_node=True,
        needs=(),
        suits="trying a job on this machine with nothing to install; several nodes are emulated as "
        "processes here, so it never scales past this machine",
        platforms=("laptop",),
    ),
    BackendProfile(
        key="ray-train",
        backend="ray",
        label="Ray Train",
        score=5,
        workloads=("batch",),
        node_span="single+multi",
        needs=("a Ray cluster or local Ray",),
        suits="training from one node to many with the least wiring; Ray places the ranks and restarts them",
        platforms=("ray", "kubernetes"),
        also_on=("laptop",),
        extra="ray",
    ),
    BackendProfile(
        key="ray-serve",
        backend="ray",
        label="Ray Serve",
        score=5,
        multi_node_score=2,
        workloads=("serving",),
        node_span="single+multi",
        needs=("a Ray cluster or local Ray",),
        suits="serving a model that fits one node, with replicas and autoscaling; a model spread "
        "over several nodes takes hand-made placement",
        platforms=("ray", "kubernetes"),
        also_on=("laptop",),
        extra="ray",
    ),
    BackendProfile(
        key="trainjob",
        backend="trainjob",
        label="Kubeflow Trainer",
        score=3,
        workloads=("batch", "serving"),
        node_span="single+multi",
        needs=("a Kubernetes namespace", "Kubeflow Trainer installed"),
        suits="Kubernetes clusters that already run Kubeflow: the deepspeed-distributed runtime does the wiring",
        platforms=("kubernetes",),
        extra="k8s",
    ),
    BackendProfile(
        key="mpijob",
        backend="mpijob",
        label="MPI Operator",
        score=2,
        workloads=("batch", "serving"),
        node_span="multi",
        needs=("a Kubernetes namespace", "the MPI Operator installed"),
        suits="multi-node runs on Kubernetes clusters with the MPI Operator: mpirun over the operator's hostfile and ssh",
        platforms=("kubernetes",),
        extra="k8s",
    ),
    BackendProfile(
        key="statefulset",
        backend="statefulset",
        label="StatefulSet + Service",
        score=1,
        workloads=("batch", "serving"),
        node_span="single+multi",
        needs=("a Kubernetes namespace",),
        suits="any Kubernetes cluster with no operator to install; dsnb does the rank wiring itself",
        platforms=("kubernetes",),
        extra="k8s",
    ),
)

#: The profiles by key.
PROFILES_BY_KEY: dict[str, BackendProfile] = {p.key: p for p in PROFILES}


def profile(key: str) -> BackendProfile:
    """The profile named ``key`` (``"local"``, ``"ray-train"``, ``"ray-serve"``, ``"trainjob"``, ...).

    Raises:
        KeyError: no profile has that key; the message lists the keys.

    Example:
        >>> profile("trainjob").backend
        'trainjob'
    """
    try:
        return PROFILES_BY_KEY[key]
    except KeyError:
        raise KeyError(f"no backend profile {key!r}; known: {', '.join(PROFILES_BY_KEY)}") from None


def profiles_for_backend(backend: str) -> list[BackendProfile]:
    """The profiles of one registry name (``"ray"`` has two: Ray Train and Ray Serve).

    Example:
        >>> [p.key for p in profiles_for_backend("ray")]
        ['ray-train', 'ray-serve']
    """
    return [p for p in PROFILES if p.backend == backend]


def available_here() -> set[str]:
    """Backend names this install of dsnb provides (``available_backends()``, as a set).

    Example:
        >>> "local" in available_here()
        True
    """
    from dsnb.backends.base import available_backends

    return set(available_backends())


def how_to_enable(prof: BackendProfile, available: Iterable[str] | None = None) -> str:
    """A sentence on what it takes to use ``prof`` here, or that it is ready.

    Args:
        prof: the profile.
        available: backend names this install provides; default: ``available_backends()``.

    Example:
        >>> how_to_enable(profile("mpijob"), available={"local"})  # doctest: +ELLIPSIS
        "MPI Operator: the 'mpijob' backend is not in this dsnb install yet..."
    """
    names = available_here() if available is None else set(available)
    needs = ", ".join(prof.needs)
    if prof.backend in names:
        return f"{prof.label} is available here (Cluster({prof.backend!r}))" + (f"; it needs {needs}" if needs else "")
    parts = [
        f"{prof.label}: the {prof.backend!r} backend is not in this dsnb install yet "
        f"(available: {', '.join(sorted(names)) or 'none'})."
    ]
    if prof.extra:
        parts.append(f"Once a dsnb release or plugin provides it, install its dependencies with pip install 'dsnb[{prof.extra}]'.")
    if needs:
        parts.append(f"It also needs {needs}.")
    return " ".join(parts)


@dataclass(frozen=True)
class Recommendation:
    """One ranked choice for a request.

    Attributes:
        profile: the backend profile.
        rank: 1 for the best choice.
        score: the profile's score for this request (see :meth:`BackendProfile.score_for`).
        reason: why it is ranked here, in one or two sentences.
        available: whether this dsnb install provides the backend.
        fallback: the backend used instead while it is not available (``"local"``), or None.

    Example:
        >>> rec = recommend("batch", multi_node=True, available={"local"})[0]
        >>> rec.text()  # doctest: +ELLIPSIS
        'Ray Train (ease 5/5): ... (not available here yet: falls back to local)'
    """

    profile: BackendProfile
    rank: int
    score: int
    reason: str
    available: bool
    fallback: str | None = None

    def status_text(self) -> str:
        """``""`` when available, else "(not available here yet: falls back to local)" or similar."""
        if self.available:
            return ""
        if self.fallback:
            return f"(not available here yet: falls back to {self.fallback})"
        return "(not available here yet)"

    def text(self) -> str:
        """The choice in one line: label, score, reason and availability."""
        line = f"{self.profile.label} (ease {self.score}/5): {self.reason}"
        status = self.status_text()
        return f"{line} {status}" if status else line


def _reason(prof: BackendProfile, workload: Workload, multi_node: bool, platform: Platform | None) -> str:
    sentences = [prof.suits[0].upper() + prof.suits[1:]]
    if multi_node and prof.emulated_multi_node:
        sentences.append("The nodes are emulated as processes on this machine: good for checking the wiring, not for scale")
    elif prof.multi_node_score is not None and multi_node and prof.multi_node_score < prof.score:
        sentences.append(f"Across nodes it drops to {prof.multi_node_score}/5")
    if platform is not None and platform not in prof.platforms:
        if prof.backend == "ray" and platform == "laptop":
            sentences.append("On a laptop it starts a local Ray (pip install ray)")
        else:
            sentences.append(f"It runs on {platform} as a second choice")
    elif platform == "kubernetes" and prof.backend == "ray":
        sentences.append("On Kubernetes it needs the KubeRay operator")
    if prof.needs:
        sentences.append("Needs " + ", ".join(prof.needs))
    return ". ".join(sentences) + "."


def recommend(
    workload: Workload,
    multi_node: bool,
    platform: Platform | None = None,
    available: set[str] | None = None,
) -> list[Recommendation]:
    """Backends that fit a request, best first, each with a reason.

    A profile fits when it runs the workload over the nodes asked for and, when a platform
    is given, runs there. Profiles whose first choice is the platform come before those
    that only also run there; then the higher score wins, then the one that needs less.

    Args:
        workload: ``"batch"`` (training) or ``"serving"`` (a long-running endpoint).
        multi_node: whether the job spans more than one node.
        platform: where it will run: ``"laptop"``, ``"kubernetes"``, ``"ray"``, or None for any.
        available: backend names this install provides; default: ``available_backends()``.

    Returns:
        Ranked :class:`Recommendation` objects (possibly empty), unavailable ones marked.

    Raises:
        ValueError: an unknown workload or platform.

    Example:
        >>> [r.profile.key for r in recommend("batch", multi_node=False, platform="ray")]
        ['ray-train']
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)} or None, got {platform!r}")
    names = available_here() if available is None else set(available)
    candidates = [p for p in PROFILES if p.fits(workload, multi_node) and (platform is None or p.runs_on(platform))]

    def order(item: tuple[int, BackendProfile]) -> tuple[int, int, int, int]:
        index, prof = item
        second_choice = int(platform is not None and platform not in prof.platforms)
        return (second_choice, -prof.score_for(multi_node), len(prof.needs), index)

    ranked = [prof for _, prof in sorted(enumerate(candidates), key=order)]
    local = PROFILES_BY_KEY["local"]
    can_fall_back = "local" in names and local.fits(workload, multi_node)
    return [
        Recommendation(
            profile=prof,
            rank=rank,
            score=prof.score_for(multi_node),
            reason=_reason(prof, workload, multi_node, platform),
            available=prof.backend in names,
            fallback="local" if prof.backend not in names and can_fall_back else None,
        )
        for rank, prof in enumerate(ranked, start=1)
    ]


def headline(recommendations: list[Recommendation]) -> str:
    """One line for the top choice, e.g. "recommended: Ray Train (not available here yet: falls back to local)".

    Example:
        >>> headline(recommend("batch", multi_node=False, platform="laptop", available={"local"}))
        'recommended: Local'
        >>> headline([])
        'no backend fits this combination'
    """
    if not recommendations:
        return "no backend fits this combination"
    top = recommendations[0]
    status = top.status_text()
    return f"recommended: {top.profile.label}" + (f" {status}" if status else "")
