"""gpufleet: know the GPUs in your Kubernetes fleet.

The packages, by floor; imports only point down (``tests/unit/test_import_graph.py``):

- `cli`: the one ``gpufleet`` command, with a sub-command group per feature.
- The features, which never import one another: `inventory` (which GPU sat in which
  node, and when), `deviceapi` (the node-local gRPC GPU resource and its NVML health
  provider), `exporter` (Prometheus metrics per GPU and per process, with pod
  attribution), `kcache` (kernel cache images and their CSI mount).
- `gpu` (the one GPU truth: NVML, simulated NVML, nvidia-smi) and `kube` (the one
  Kubernetes client, list+watch, exec, leases).
- `core`: configuration, logging, the health server, retry, errors.

This module holds only the version, and imports nothing.
"""

__version__ = "0.1.0"
