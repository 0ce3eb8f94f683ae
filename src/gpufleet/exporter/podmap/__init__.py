"""Who owns a GPU process or a GPU: cgroup parsing, the pod index and kubelet PodResources."""
