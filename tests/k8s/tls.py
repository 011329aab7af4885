"""A self-signed certificate authority and server certificate for the emulator's in-cluster endpoint.

Pods reach the API server as ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`` and
check its certificate against the cluster's CA (``ca.crt`` in the service account volume), as
client-go's ``rest.InClusterConfig`` and every in-cluster client do; the emulator's in-cluster
endpoint serves TLS with a certificate from this CA, so a pod that skipped the check or used
plain HTTP would fail as it would on a cluster. Made with the ``openssl`` command (Debian's
openssl package), an elliptic-curve key so that it takes milliseconds.

Example::

    pair = make_server_certificate(Path(tmp), hosts=("127.0.0.1",))
    context = ssl.create_default_context(cafile=pair.ca_file)
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    """Files of a CA and of a server certificate it signed."""

    ca_file: str
    cert_file: str
    key_file: str


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {done.stderr.strip()}")


def make_server_certificate(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1",),
                            names: tuple[str, ...] = ("kubernetes", "kubernetes.default", "kubernetes.default.svc")) -> Certificates:
    """A CA and a server certificate for ``hosts`` (IP addresses) and ``names`` (DNS names), valid one day."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    key, request, cert = folder / "server.key", folder / "server.csr", folder / "server.crt"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    _openssl("req", "-x509", *curve, "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "1",
             "-subj", "/CN=emulator-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-new", *curve, "-nodes", "-keyout", str(key), "-out", str(request), "-subj", "/CN=kube-apiserver")
    alt_names = ",".join([*(f"IP:{h}" for h in hosts), *(f"DNS:{n}" for n in names)])
    extensions = folder / "server.ext"
    extensions.write_text(f"subjectAltName={alt_names}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(extensions))
    return Certificates(str(ca_cert), str(cert), str(key))
