"""Generated from proto/csi/v1/csi.proto by `make proto`; do not edit."""
