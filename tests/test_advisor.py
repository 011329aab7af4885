"""The backend advisor: the profile table and the ranking of recommendations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dsnb.advisor import BackendProfile, Platform, Workload, all_profiles, headline, how_to_enable, profile, recommend

ONLY_LOCAL = {"local"}
EVERYTHING = {p.backend for p in all_profiles()}


@dataclass(frozen=True)
class Case:
    """One request: what must come first, what must not, and what must be left out."""

    id: str
    workload: Workload
    multi_node: bool
    platform: Platform | None
    first: str
    not_first: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    available: frozenset[str] = field(default_factory=lambda: frozenset(EVERYTHING))


CASES = [
    Case("laptop batch is local", "batch", False, "laptop", "local", excluded=("trainjob", "statefulset", "mpijob")),
    Case("laptop multi-node batch is still local", "batch", True, "laptop", "local"),
    Case("ray platform batch is Ray Train", "batch", False, "ray", "ray-train", excluded=("ray-serve", "local", "trainjob")),
    Case("ray platform multi-node batch is Ray Train", "batch", True, "ray", "ray-train"),
    Case("ray platform serving is Ray Serve", "serving", False, "ray", "ray-serve", excluded=("ray-train",)),
    Case("serving on one node needs nothing on this machine", "serving", False, None, "local", not_first=("ray-serve",),
         excluded=("ray-train", "mpijob")),
    Case("laptop serving is local", "serving", False, "laptop", "local", not_first=("ray-serve",), excluded=("trainjob",)),
    Case("serving over many nodes is not Ray Serve", "serving", True, None, "trainjob", not_first=("ray-serve",)),
    Case("kubernetes serving over many nodes", "serving", True, "kubernetes", "trainjob", not_first=("kuberay-serve",),
         excluded=("local", "ray-serve")),
    Case("multi-node batch anywhere is Ray Train", "batch", True, None, "ray-train", not_first=("local",)),
    Case("MPI Operator is multi-node only", "batch", False, "kubernetes", "kuberay-train", excluded=("mpijob", "local", "ray-train")),
    Case("kubernetes serving on one node is KubeRay", "serving", False, "kubernetes", "kuberay-serve", excluded=("ray-serve",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ranking(case: Case) -> None:
    recs = recommend(case.workload, case.multi_node, case.platform, available=set(case.available))
    keys = [r.profile.key for r in recs]
    assert keys[0] == case.first, keys
    assert [r.rank for r in recs] == list(range(1, len(recs) + 1))
    for key in case.not_first:
        assert key in keys and keys[0] != key
    for key in case.excluded:
        assert key not in keys
    for rec in recs:
        assert rec.profile.fits(case.workload, case.multi_node) and rec.reason
        assert rec.score == rec.profile.score_for(case.multi_node)


def test_ranking_is_by_score_within_a_platform() -> None:
    recs = recommend("batch", True, "kubernetes", available=EVERYTHING)
    assert [r.profile.key for r in recs] == ["kuberay-train", "trainjob", "mpijob", "statefulset"]
    assert [r.score for r in recs] == [4, 3, 2, 1]


def test_ray_serve_scores_two_across_nodes() -> None:
    (serve,) = recommend("serving", True, "ray", available=EVERYTHING)
    assert serve.score == 2 and "2/5" in serve.reason
    (serve,) = recommend("serving", False, "ray", available=EVERYTHING)
    assert serve.score == 5


@dataclass(frozen=True)
class AvailabilityCase:
    id: str
    workload: Workload
    platform: Platform | None
    available: frozenset[str]
    headline: str


AVAILABILITY = [
    AvailabilityCase("ray missing, local batch fallback", "batch", "ray", frozenset({"local"}),
                     "recommended: Ray Train (not available here yet: falls back to local)"),
    AvailabilityCase("ray present", "batch", "ray", frozenset({"local", "ray"}), "recommended: Ray Train"),
    AvailabilityCase("local serving is the fallback for serving", "serving", "ray", frozenset({"local"}),
                     "recommended: Ray Serve (not available here yet: falls back to local)"),
    AvailabilityCase("no fallback without local", "serving", "ray", frozenset({"trainjob"}),
                     "recommended: Ray Serve (not available here yet)"),
    AvailabilityCase("nothing installed at all", "batch", "laptop", frozenset(),
                     "recommended: Local (not available here yet)"),
]


@pytest.mark.parametrize("case", AVAILABILITY, ids=lambda c: c.id)
def test_unavailable_backends_are_marked(case: AvailabilityCase) -> None:
    recs = recommend(case.workload, False, case.platform, available=set(case.available))
    assert headline(recs) == case.headline
    for rec in recs:
        assert rec.available == (rec.profile.backend in case.available)
        if rec.available:
            assert rec.fallback is None and rec.status_text() == ""
        else:
            assert "not available here yet" in rec.text()


def test_default_availability_is_this_install() -> None:
    recs = {r.profile.key: r for r in recommend("batch", False)}
    assert recs["local"].available
    assert recs["trainjob"].available and recs["statefulset"].available
    assert recs["ray-train"].available and recs["ray-train"].fallback is None


def test_profile_table_matches_the_field_notes() -> None:
    expected = {  # key: (backend, score, multi-node score, workloads, single, multi)
        "statefulset": ("statefulset", 1, 1, ("batch", "serving"), True, True),
        "mpijob": ("mpijob", 2, 2, ("batch", "serving"), False, True),
        "trainjob": ("trainjob", 3, 3, ("batch", "serving"), True, True),
        "ray-train": ("ray", 5, 5, ("batch",), True, True),
        "ray-serve": ("ray", 5, 2, ("serving",), True, True),
        "local": ("local", 5, 1, ("batch", "serving"), True, True),
        "kuberay-train": ("kuberay", 4, 4, ("batch",), True, True),
        "kuberay-serve": ("kuberay", 4, 2, ("serving",), True, True),
    }
    assert {p.key for p in all_profiles()} == set(expected)
    for key, (backend, score, multi_score, workloads, single, multi) in expected.items():
        p = profile(key)
        assert (p.backend, p.score, p.score_for(True), p.workloads, p.single_node, p.multi_node) == (
            backend, score, multi_score, workloads, single, multi)
        assert p.label and p.suits and p.summary().startswith(p.label)
    assert profile("local").needs == () and profile("local").emulated_multi_node
    assert "the MPI Operator installed" in profile("mpijob").needs
    assert "Kubeflow Trainer installed" in profile("trainjob").needs
    assert "a Ray cluster or local Ray" in profile("ray-train").needs
    assert profile("ray-train").summary() == "Ray Train — ease 5/5 — batch, 1..n nodes"


def test_how_to_enable_names_the_install_and_the_needs() -> None:
    text = how_to_enable(profile("mpijob"), available={"local"})
    assert "cannot run in this install" in text and "dsnb[k8s]" in text and "MPI Operator installed" in text
    assert how_to_enable(profile("local"), available={"local"}).startswith("Local is available here")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: recommend("training", False), "workload must be one of batch, serving"),  # type: ignore[arg-type]
        (lambda: recommend("batch", False, platform="slurm"), "platform must be one of"),  # type: ignore[arg-type]
        (lambda: profile("slurm"), "known: local"),
        (lambda: BackendProfile("x", "x", "X", 6, ("batch",), "single", (), "", ("laptop",)), "outside 1..5"),
    ],
)
def test_bad_requests_are_refused(call, message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        call()


def test_each_profile_says_what_its_backend_really_runs() -> None:
    """The profiles are declared by the backends: serving is listed exactly where the backend serves."""
    from dsnb.backends.base import Backend, builtin_backends, load_backend
    from dsnb.backends.profiles import BUILTIN_PROFILES

    for name in builtin_backends():
        backend = load_backend(name)
        assert backend.profiles == BUILTIN_PROFILES[name] and all(p.backend == name for p in backend.profiles)
        serves = backend.serve_plan is not Backend.serve_plan
        assert any("serving" in p.workloads for p in backend.profiles) == serves, name
        assert any("batch" in p.workloads for p in backend.profiles), name


def test_a_plugin_backend_that_declares_a_profile_is_ranked() -> None:
    from dsnb.backends.base import Backend, register_backend, unregister_backend

    class Slurm(Backend):
        name = "slurm-test"
        profiles = (BackendProfile(key="slurm-test", backend="slurm-test", label="Slurm", score=4, workloads=("batch",),
                                   node_span="multi", needs=("a Slurm account",), suits="HPC centres",
                                   platforms=("kubernetes",)),)

    register_backend("slurm-test", Slurm)
    try:
        keys = [r.profile.key for r in recommend("batch", True, "kubernetes")]
        assert keys[:2] == ["slurm-test", "kuberay-train"]  # both score 4; the plugin needs less
        assert profile("slurm-test").label == "Slurm"
    finally:
        unregister_backend("slurm-test")
    assert "slurm-test" not in [p.key for p in all_profiles()]
