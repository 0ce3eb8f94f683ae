"""The node-local device API: a Kubernetes-style GPU resource served over gRPC."""
