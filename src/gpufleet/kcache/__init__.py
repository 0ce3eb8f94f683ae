"""Kernel cache images: JIT kernel caches (Triton, vLLM, Inductor) packed as OCI images.

`format` reads and validates cache directories, `image` builds reproducible
images, `oci` talks to registries, `extract` unpacks safely into a
content-addressed store, `compat` matches caches to GPUs, `sign` signs and
verifies in cosign's key-based format.
"""
