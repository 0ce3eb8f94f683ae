"""Generated from proto/gpufleet/device/v1alpha1/gpu.proto by `make proto`; do not edit."""
