"""A private pod network made of Linux network namespaces, for multi-pod tests on one machine.

Each pod is a network namespace whose only link, ``eth0``, is one end of a veth pair; the
other ends are enslaved to a Linux bridge in a separate "switch" namespace, so every pod
reaches every other one on ``<subnet>.0/24`` as pods of one cluster do. Nothing is created
in the caller's (root) network namespace, so the traffic never leaves the namespaces made here.

``ip netns exec NS`` bind-mounts ``/etc/netns/NS/hosts`` over ``/etc/hosts``, which is how
:meth:`PodNetwork.hosts` gives the pods a cluster's DNS names.

Example::

    with PodNetwork(["job-launcher", "job-worker-0"]) as net:
        net.hosts({"job-launcher": ["job-launcher.job.ml.svc"], "job-worker-0": ["job-worker-0.job.ml.svc"]})
        subprocess.run(net.command("job-worker-0", ["python3", "-m", "http.server"]))
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

NETNS_ETC = Path("/etc/netns")
_serial = itertools.count()


def _ip(*args: str) -> None:
    """Run ``ip ARGS``; raise with ip's own message when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


class PodNetwork:
    """One network namespace per pod, all joined by a bridge; every namespace is removed on exit.

    Args:
        names: pod names, in order; pod ``i`` gets address ``<subnet>.<i + 1>``.
        subnet: the first three octets of a private /24 (choose one no other test uses at the same time).

    Namespace names are ``dsnb-<pid>-<serial>-<i>`` (the switch: ``...-sw``), unique per process
    and per network, so concurrent tests and networks do not collide.
    """

    def __init__(self, names: Sequence[str], subnet: str = "10.231.9") -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"pod names must be distinct and non-empty: {list(names)}")
        if len(names) > 250:
            raise ValueError("a /24 holds at most 250 pods here")
        self.names = list(names)
        self.subnet = subnet
        prefix = f"dsnb-{os.getpid()}-{next(_serial)}"
        self.switch = f"{prefix}-sw"
        self._namespaces = {name: f"{prefix}-{i}" for i, name in enumerate(self.names)}
        self._made: list[str] = []

    # -- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> PodNetwork:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = self._namespaces[name]
            self._add_namespace(ns)
            # Both ends are born inside namespaces of ours: the switch end in the switch, the
            # pod end moved straight into the pod and named eth0 there.
            port = f"p{i}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Delete every namespace made (veth pairs and the bridge go with them) and their /etc/netns folders.

        Processes still running inside a namespace keep it alive without its name; the caller
        must stop its processes first.
        """
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        for ns in self._made:
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made.clear()

    # -- queries ------------------------------------------------------------------------------
    def namespace(self, pod: str) -> str:
        """The network namespace of ``pod`` (for ``ip netns exec``)."""
        return self._namespaces[pod]

    def address(self, pod: str) -> str:
        """The IPv4 address of ``pod``'s ``eth0``."""
        return f"{self.subnet}.{self.names.index(pod) + 1}"

    def namespaces(self) -> list[str]:
        """Every namespace this network made and still holds, the switch included."""
        return list(self._made)

    # -- configuration ------------------------------------------------------------------------
    def hosts(self, mapping: dict[str, list[str]]) -> None:
        """Write ``/etc/hosts`` for every pod: localhost, then each mapped pod's address and DNS names.

        Args:
            mapping: pod name -> the names it answers to (e.g. ``["job-worker-0.job.ml.svc", "job-worker-0"]``).
        """
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{self.address(pod)} {' '.join(names)}" for pod, names in mapping.items() if names]
        text = "\n".join(lines) + "\n"
        for pod in self.names:
            folder = NETNS_ETC / self.namespace(pod)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(text)

    def command(self, pod: str, argv: Sequence[str], hostname: str | None = None) -> list[str]:
        """``argv`` wrapped to run in ``pod``'s network namespace, with its own hostname.

        The process also gets a private UTS namespace whose hostname is ``hostname``
        (default: the pod name), as a pod's container has; without it every "pod" reports
        the machine's hostname.
        """
        return ["ip", "netns", "exec", self.namespace(pod), "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', hostname or pod, *argv]
