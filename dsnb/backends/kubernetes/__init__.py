"""Shared Kubernetes machinery for dsnb's Kubernetes backends (needs the ``k8s`` extra)."""
