"""A NetworkPolicy that keeps a job's pods to themselves (``PodOptions(network_policy=True)``).

Without one, every pod of the cluster can reach a job's rendezvous port, its collectives, a
model server's port and, on KubeRay, the Ray head. With it, the job's pods take traffic only
from each other; a served model also from the peers ``PodOptions.serve_ingress_from`` names, on
its port only; a Ray head also from the KubeRay operator, on the dashboard's port (KubeRay asks
it for the job's status). It needs a network plugin that enforces NetworkPolicies (Calico,
Cilium, ...); where none does, the object changes nothing. The kubelet's probes come from the
node and are not subject to it on the common plugins.

Example:
    >>> policy = network_policy("tiny-gpt-x7k2", "ml")
    >>> policy["spec"]["ingress"]
    [{'from': [{'podSelector': {'matchLabels': {'dsnb.io/job': 'tiny-gpt-x7k2'}}}]}]
"""

from __future__ import annotations

import copy
from typing import Any

from dsnb.backends.kubernetes.labels import JOB, job_labels

KIND = "NetworkPolicy"
API_VERSION = "networking.k8s.io/v1"
#: The KubeRay operator's pods, as its Helm chart labels them (any namespace).
KUBERAY_OPERATOR = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
RAY_DASHBOARD_PORT = 8265


def network_policy(name: str, namespace: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The NetworkPolicy ``<job>``: ingress to the job's pods only from the job's pods, plus the rules in ``extra``.

    Example:
        >>> rules = network_policy("a", "ml", [{"from": [KUBERAY_OPERATOR], "ports": [{"port": 8265}]}])["spec"]["ingress"]
        >>> len(rules), rules[1]["ports"]
        (2, [{'port': 8265}])
    """
    own = {"podSelector": {"matchLabels": {JOB: name}}}
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels(name)},
        "spec": {"podSelector": {"matchLabels": {JOB: name}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [own]}, *copy.deepcopy(extra or [])]},
    }


def allow_serving(manifests: list[dict[str, Any]], port: int, peers: list[dict[str, Any]]) -> None:
    """Let ``peers`` (NetworkPolicyPeer dicts) reach a served model's ``port``, in the job's NetworkPolicy if it has one.

    Example:
        >>> manifests = [network_policy("a", "ml")]
        >>> allow_serving(manifests, 8000, [{"namespaceSelector": {"matchLabels": {"team": "web"}}}])
        >>> manifests[0]["spec"]["ingress"][1]
        {'from': [{'namespaceSelector': {'matchLabels': {'team': 'web'}}}], 'ports': [{'port': 8000, 'protocol': 'TCP'}]}
    """
    for manifest in manifests:
        if manifest["kind"] == KIND and peers:
            manifest["spec"]["ingress"].append({"from": copy.deepcopy(peers), "ports": [{"port": port, "protocol": "TCP"}]})
