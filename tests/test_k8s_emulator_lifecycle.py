"""The emulator's pod identity and object lifecycle, as a real API server has them.

Graceful deletion and finalizers, the ``/scale`` subresource, the ServiceAccount admission
plugin and service account tokens, the in-cluster TLS endpoint, and RBAC's refusal to let a
user grant what the user does not hold. Each is what a dsnb behaviour depends on: a job's pods
stop gracefully and are ignored while terminating, a StatefulSet job scales itself to 0 through
its own ServiceAccount, and a user can give a job only rights the user has.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest
from k8s.emulator import KubeEmulator
from kubernetes import client
from kubernetes.client.exceptions import ApiException

NS = "ml"
RBAC = "rbac.authorization.k8s.io"


def running_pod(name: str, grace: int | None = None, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"containers": [{"name": "main", "image": "img"}], "nodeName": "node-1", **spec}}
    if grace is not None:
        body["spec"]["terminationGracePeriodSeconds"] = grace
    return body


def message(error: ApiException) -> str:
    return json.loads(error.body)["message"]


# -- graceful deletion and finalizers ------------------------------------------------------------

def test_a_pod_on_a_node_terminates_until_its_kubelet_deletes_it(emu: KubeEmulator) -> None:
    emu.create(running_pod("p", grace=45))
    with client.ApiClient(emu.configuration()) as api:
        client.CoreV1Api(api).delete_namespaced_pod("p", NS)
    pod = emu.get("v1", "Pod", NS, "p")
    assert pod is not None and pod["metadata"]["deletionGracePeriodSeconds"] == 45 and pod["metadata"]["deletionTimestamp"]
    emu.delete("v1", "Pod", NS, "p", grace_period=60)  # a longer grace period changes nothing
    assert emu.get("v1", "Pod", NS, "p")["metadata"]["deletionGracePeriodSeconds"] == 45
    emu.delete("v1", "Pod", NS, "p", grace_period=0)  # the kubelet, once the containers stopped
    assert emu.get("v1", "Pod", NS, "p") is None


def test_pods_not_scheduled_or_finished_go_at_once(emu: KubeEmulator) -> None:
    emu.create({**running_pod("waiting"), "spec": {"containers": [{"name": "main", "image": "img"}]}})
    emu.create(running_pod("done"))
    emu.patch_status("v1", "Pod", NS, "done", {"phase": "Succeeded"})
    for name in ("waiting", "done"):
        emu.delete("v1", "Pod", NS, name)
        assert emu.get("v1", "Pod", NS, name) is None


def test_finalizers_hold_an_object_until_they_are_removed(emu: KubeEmulator) -> None:
    emu.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "held", "namespace": NS, "finalizers": ["example.com/keep"]}})
    with client.ApiClient(emu.configuration()) as api:
        core = client.CoreV1Api(api)
        core.delete_namespaced_config_map("held", NS)
        held = core.read_namespaced_config_map("held", NS)
        assert held.metadata.deletion_timestamp is not None
        core.patch_namespaced_config_map("held", NS, {"metadata": {"finalizers": None}})
        with pytest.raises(ApiException) as info:
            core.read_namespaced_config_map("held", NS)
    assert info.value.status == 404


def test_owned_pods_are_collected_gracefully(emu: KubeEmulator) -> None:
    owner = emu.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": NS}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    emu.create({**running_pod("child"), "metadata": {"name": "child", "namespace": NS, "ownerReferences": [ref]}})
    emu.delete("v1", "ConfigMap", NS, "owner")
    assert emu.get("v1", "Pod", NS, "child")["metadata"]["deletionGracePeriodSeconds"] == 30  # the default


# -- the scale subresource -----------------------------------------------------------------------

def stateful_set(name: str, replicas: int) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}


def test_a_stateful_set_scales_through_its_scale_subresource(emu: KubeEmulator) -> None:
    emu.create(stateful_set("s", 3))
    with client.ApiClient(emu.configuration()) as api:
        apps = client.AppsV1Api(api)
        scale = apps.read_namespaced_stateful_set_scale("s", NS)
        assert (scale.spec.replicas, scale.status.selector) == (3, "app=s")
        assert apps.patch_namespaced_stateful_set_scale("s", NS, {"spec": {"replicas": 0}}).spec.replicas == 0
        assert emu.get("apps/v1", "StatefulSet", NS, "s")["spec"]["replicas"] == 0
        with pytest.raises(ApiException) as info:
            apps.patch_namespaced_stateful_set_scale("s", NS, {"spec": {"replicas": -1}})
        assert info.value.status == 422 and "spec.replicas" in message(info.value)
        with pytest.raises(ApiException) as missing:
            apps.patch_namespaced_stateful_set_scale("nope", NS, {"spec": {"replicas": 0}})
        assert missing.value.status == 404


# -- service accounts ----------------------------------------------------------------------------

def test_every_namespace_has_a_default_service_account(emu: KubeEmulator) -> None:
    emu.add_namespace("team")
    assert emu.get("v1", "ServiceAccount", "team", "default") is not None


def test_a_pod_naming_a_missing_service_account_is_refused(emu: KubeEmulator) -> None:
    with client.ApiClient(emu.configuration()) as api:
        with pytest.raises(ApiException) as info:
            client.CoreV1Api(api).create_namespaced_pod(NS, running_pod("p", serviceAccountName="ghost"))
    assert info.value.status == 403
    assert message(info.value) == 'pods "p" is forbidden: error looking up service account ml/ghost: serviceaccount "ghost" not found'
    assert emu.get("v1", "Pod", NS, "p") is None


def test_a_token_is_mounted_unless_the_pod_or_its_account_says_no(emu: KubeEmulator) -> None:
    emu.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "quiet", "namespace": NS},
                "automountServiceAccountToken": False})
    mounted = emu.create(running_pod("mounted"))
    volume = next(v for v in mounted["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
    assert [next(iter(s)) for s in volume["projected"]["sources"]] == ["serviceAccountToken", "configMap", "downwardAPI"]
    assert {"name": volume["name"], "readOnly": True, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"} in \
        mounted["spec"]["containers"][0]["volumeMounts"]
    assert mounted["spec"]["serviceAccountName"] == "default"
    for pod in (emu.create(running_pod("opted-out", automountServiceAccountToken=False)),
                emu.create(running_pod("quiet-account", serviceAccountName="quiet"))):
        assert not pod["spec"].get("volumes") and not pod["spec"]["containers"][0].get("volumeMounts")
    pod_says_yes = emu.create(running_pod("pod-wins", serviceAccountName="quiet", automountServiceAccountToken=True))
    assert pod_says_yes["spec"]["volumes"][0]["name"].startswith("kube-api-access-")


def test_a_service_account_token_is_authorized_by_rbac_and_dies_with_its_account(emu: KubeEmulator) -> None:
    emu.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "job", "namespace": NS}})
    emu.create({"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": {"name": "r", "namespace": NS},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]})
    emu.create({"apiVersion": f"{RBAC}/v1", "kind": "RoleBinding", "metadata": {"name": "r", "namespace": NS},
                "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": "job", "namespace": NS}]})
    token = emu.service_account_token(NS, "job")
    with client.ApiClient(emu.configuration(token=token)) as api:
        core = client.CoreV1Api(api)
        assert core.list_namespaced_config_map(NS).items == []
        with pytest.raises(ApiException) as refused:
            core.list_namespaced_secret(NS)
        assert refused.value.status == 403 and 'User "system:serviceaccount:ml:job" cannot list' in message(refused.value)
        emu.delete("v1", "ServiceAccount", NS, "job")
        with pytest.raises(ApiException) as gone:
            core.list_namespaced_config_map(NS)
        assert gone.value.status == 401


def test_pods_reach_the_api_over_tls_that_they_can_verify(emu: KubeEmulator) -> None:
    endpoint = emu.in_cluster()
    url = f"https://{endpoint.host}:{endpoint.port}/api/v1/namespaces/{NS}/configmaps"
    trusted = ssl.create_default_context(cafile=endpoint.ca_file)
    with urllib.request.urlopen(url, context=trusted, timeout=10) as response:
        assert json.loads(response.read())["kind"] == "ConfigMapList"
    with pytest.raises(urllib.error.URLError) as untrusted:  # the system's CAs do not know the cluster's
        urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on the in-cluster port
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=10)


# -- no escalation -------------------------------------------------------------------------------

def bind_user(emu: KubeEmulator, rules: list[dict[str, Any]]) -> str:
    emu.create({"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": {"name": "alice", "namespace": NS}, "rules": rules})
    emu.create({"apiVersion": f"{RBAC}/v1", "kind": "RoleBinding", "metadata": {"name": "alice", "namespace": NS},
                "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "alice"},
                "subjects": [{"kind": "User", "name": "alice", "apiGroup": RBAC}]})
    return emu.add_user("alice")


ROLES = [{"apiGroups": [RBAC], "resources": ["roles", "rolebindings"], "verbs": ["create"]}]


def test_a_user_may_grant_only_what_the_user_holds(emu: KubeEmulator) -> None:
    token = bind_user(emu, [*ROLES, {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"]}])
    narrower = {"metadata": {"name": "job"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["job"], "verbs": ["patch"]}]}
    wider = {"metadata": {"name": "too-much"}, "rules": [
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "resourceNames": ["job"], "verbs": ["patch"]}]}
    with client.ApiClient(emu.configuration(token=token)) as api:
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_namespaced_role(NS, narrower)
        with pytest.raises(ApiException) as info:
            rbac.create_namespaced_role(NS, wider)
        assert info.value.status == 403
        assert message(info.value) == (
            'roles.rbac.authorization.k8s.io "too-much" is forbidden: user "alice" (groups=["system:authenticated"]) is attempting '
            'to grant RBAC permissions not currently held:\n{APIGroups:["apps"], Resources:["statefulsets/scale"], '
            'ResourceNames:["job"], Verbs:["patch"]}')
        binding = {"metadata": {"name": "job"}, "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "job"},
                   "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NS}]}
        rbac.create_namespaced_role_binding(NS, binding)
    emu.create({"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": {"name": "admin-made", "namespace": NS},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]})
    with client.ApiClient(emu.configuration(token=token)) as api:
        with pytest.raises(ApiException) as bind:
            client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(NS, {**binding, "metadata": {"name": "steal"},
                                                                                   "roleRef": {**binding["roleRef"], "name": "admin-made"}})
    assert bind.value.status == 403 and 'Resources:["secrets"]' in message(bind.value)


def test_bind_and_escalate_verbs_waive_the_check(emu: KubeEmulator) -> None:
    token = bind_user(emu, [*ROLES, {"apiGroups": [RBAC], "resources": ["roles"], "verbs": ["escalate"]},
                            {"apiGroups": [RBAC], "resources": ["roles"], "verbs": ["bind"], "resourceNames": ["admin-made"]}])
    emu.create({"apiVersion": f"{RBAC}/v1", "kind": "Role", "metadata": {"name": "admin-made", "namespace": NS},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]})
    with client.ApiClient(emu.configuration(token=token)) as api:
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_namespaced_role(NS, {"metadata": {"name": "big"}, "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]})
        rbac.create_namespaced_role_binding(NS, {"metadata": {"name": "b"}, "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "admin-made"},
                                                 "subjects": [{"kind": "User", "name": "bob", "apiGroup": RBAC}]})
