"""Who owns a GPU process or a GPU: cgroup parsing, the pod index and kubelet PodResources.

- `resolver`: from a PID to its pod, namespace and container;
- `procfs`: process facts from a proc root (start time, owner, command line, pod);
- `cgroup`: the pod and container in ``/proc/<pid>/cgroup``;
- `podresources`: which container holds which GPU, from the kubelet, over the stubs in
  `kubelet_v1` (generated from ``proto/k8s.io/``, ``make proto``);
- `resourceslices` and `draindex`: which GPU a DRA device is, from this node's
  ResourceSlices.
"""
