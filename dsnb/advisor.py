"""Which backend fits a job: the registered backends' profiles, ranked for a request.

Each backend declares its profiles (:mod:`dsnb.backends.profiles`: what it runs, over how
many nodes, where, and an ease-of-use score from 1 to 5 from running the same DeepSpeed job on
each backend); the advisor reads them from the registry. :func:`recommend` ranks the profiles that fit a request and marks the
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

from dsnb.backends.profiles import PLATFORMS, WORKLOADS, BackendProfile, Platform, Workload

__all__ = ["PLATFORMS", "WORKLOADS", "BackendProfile", "Recommendation", "all_profiles", "available_here",
           "headline", "how_to_enable", "profile", "profiles_for_backend", "recommend"]



def all_profiles() -> tuple[BackendProfile, ...]:
    """Every registered backend's profiles, built-in ones first, each backend's in its order.

    Read from the registry (:func:`dsnb.backends.base.backend_profiles`), so a plugin backend
    that declares a profile is ranked too, and no table here can go stale.

    Example:
        >>> [p.key for p in all_profiles()][:3]
        ['local', 'statefulset', 'mpijob']
    """
    from dsnb.backends.base import available_backends, backend_profiles, builtin_backends
    from dsnb.errors import BackendUnavailable

    names = [*builtin_backends(), *(n for n in available_backends() if n not in builtin_backends())]
    found: list[BackendProfile] = []
    for name in names:
        try:
            found.extend(backend_profiles(name))
        except BackendUnavailable:
            continue  # a plugin whose dependencies are missing: it cannot say what it is like
    return tuple(found)


def profile(key: str) -> BackendProfile:
    """The profile named ``key`` (``"local"``, ``"ray-train"``, ``"ray-serve"``, ``"trainjob"``, ...).

    Raises:
        KeyError: no profile has that key; the message lists the keys.

    Example:
        >>> profile("trainjob").backend
        'trainjob'
    """
    by_key = {p.key: p for p in all_profiles()}
    try:
        return by_key[key]
    except KeyError:
        raise KeyError(f"no backend profile {key!r}; known: {', '.join(by_key)}") from None


def profiles_for_backend(backend: str) -> list[BackendProfile]:
    """The profiles of one registry name (``"ray"`` has two: Ray Train and Ray Serve).

    Example:
        >>> [p.key for p in profiles_for_backend("ray")]
        ['ray-train', 'ray-serve']
    """
    return [p for p in all_profiles() if p.backend == backend]


def available_here() -> set[str]:
    """Backend names this install of dsnb can run: registered, with their extra's packages installed.

    Example:
        >>> "local" in available_here()
        True
    """
    from dsnb.backends.base import available_backends, backend_installed

    return {name for name in available_backends() if backend_installed(name)}


def how_to_enable(prof: BackendProfile, available: Iterable[str] | None = None) -> str:
    """A sentence on what it takes to use ``prof`` here, or that it is ready.

    Args:
        prof: the profile.
        available: backend names this install provides; default: ``available_backends()``.

    Example:
        >>> how_to_enable(profile("mpijob"), available={"local"})  # doctest: +ELLIPSIS
        "MPI Operator: the 'mpijob' backend cannot run in this install (available: local)..."
    """
    names = available_here() if available is None else set(available)
    needs = ", ".join(prof.needs)
    if prof.backend in names:
        return f"{prof.label} is available here (Cluster({prof.backend!r}))" + (f"; it needs {needs}" if needs else "")
    parts = [
        f"{prof.label}: the {prof.backend!r} backend cannot run in this install "
        f"(available: {', '.join(sorted(names)) or 'none'})."
    ]
    if prof.extra:
        parts.append(f"Install what it needs with pip install 'dsnb[{prof.extra}]'.")
    else:
        parts.append("Install the package that provides it.")
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
    _check_request(workload, platform)
    names = available_here() if available is None else set(available)
    every = all_profiles()
    ranked = _ranked(every, workload, multi_node, platform)
    local = next(p for p in every if p.key == "local")
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


def _check_request(workload: str, platform: str | None) -> None:
    """Refuse an unknown workload or platform (see :func:`recommend`)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)} or None, got {platform!r}")


def _ranked(profiles: list[BackendProfile], workload: Workload, multi_node: bool, platform: str | None) -> list[BackendProfile]:
    """The profiles that fit, first choices for ``platform`` first, then by score, then by fewer needs."""
    candidates = [p for p in profiles if p.fits(workload, multi_node) and (platform is None or p.runs_on(platform))]

    def order(item: tuple[int, BackendProfile]) -> tuple[int, int, int, int]:
        index, prof = item
        second_choice = int(platform is not None and platform not in prof.platforms)
        return (second_choice, -prof.score_for(multi_node), len(prof.needs), index)

    return [prof for _, prof in sorted(enumerate(candidates), key=order)]


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
