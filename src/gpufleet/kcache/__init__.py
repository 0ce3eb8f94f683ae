"""Kernel cache images: JIT kernel caches (Triton, vLLM, Inductor) packed as OCI images.

- `cli` is ``gpufleet cache``; `errors` the feature's exceptions (each names its file,
  blob or reference); `model` what a cache is to the rest of the feature; `progress` the
  byte progress bar of a long transfer.
- `format` reads and validates cache directories; `groups` names Triton's kernel groups and
  rewrites their ``__grp__`` child paths; `compat` matches caches to GPUs.
- `image` builds reproducible images; `labels` writes and reads their config labels.
- `reference` parses image references; `credentials` reads docker's config.json;
  `oci` reads and writes blobs and manifests in registries, over a `session` (origin,
  redirects, deadline) that answers challenges through `auth`, reads answers within bounds
  (`responses`) and keeps secrets out of logs (`redact`); `transfer` moves images between
  registries and the store.
- `tarstream` reads a layer as a stream; `extract` unpacks it safely into the
  content-addressed `store`; `mcv` knows the layouts and manifests of MCV-built images.
- `keys` loads signing keys; `sign` signs and verifies in cosign's key-based format (v2, the
  ``.sig`` tag); `bundle` and `referrers` do the same for cosign v3 (a Sigstore bundle as an
  OCI 1.1 referrer); `trust` is what checking either takes (the digest to check, capped
  reads, which trusted key signed); `policy` decides which keys a cache must be signed with.

The cluster side (GKM-compatible; docs/kcache-cluster.md):

- `cluster` holds the names and the CSI volume contract every part agrees on; `objects`
  the API objects' models (parsing, conditions); `patches` the merge patches that write
  them; `crds` the CRDs generated from them.
- `operator` resolves and verifies caches and rolls node status up (kopf).
- `node` is the one node process: the agent (GPUs, pulls, node objects, Node labels) and
  the `csi` plugin sharing one state; `mounts` reads mountinfo and makes read-only binds,
  `publications` records what is published, and `gc` collects the store.
"""
