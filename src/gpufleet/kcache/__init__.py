"""Kernel cache images: JIT kernel caches (Triton, vLLM, Inductor) packed as OCI images.

- `format` reads and validates cache directories; `compat` matches caches to GPUs.
- `image` builds reproducible images; `labels` writes and reads their config labels.
- `reference` parses image references; `credentials` reads docker's config.json;
  `oci` talks to registries; `transfer` moves images between them and the store.
- `tarstream` reads a layer as a stream; `extract` unpacks it safely into the
  content-addressed `store`; `mcv` knows the layouts and manifests of MCV-built images.
- `keys` loads signing keys; `sign` signs and verifies in cosign's key-based format.
"""
