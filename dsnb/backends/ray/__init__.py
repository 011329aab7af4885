"""The Ray backend: DeepSpeed under Ray Train, on a Ray cluster or on Kubernetes through KubeRay."""
