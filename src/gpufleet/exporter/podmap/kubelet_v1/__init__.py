"""Generated from proto/k8s.io/kubelet/podresources/v1/api.proto by `make proto`; do not edit."""
