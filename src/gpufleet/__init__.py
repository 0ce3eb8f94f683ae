"""gpufleet: know the GPUs in your Kubernetes fleet."""

__version__ = "0.1.0"
