"""The GPU exporter: Prometheus metrics per GPU and per GPU process, with pod attribution.

Collection runs in a background loop into immutable snapshots; `/metrics` renders
the latest snapshot through a custom Collector, so a scrape never touches NVML,
/proc or the Kubernetes API.

- `collector`: the collection loop, NVML, /proc and the pod maps into one `snapshot`
  (immutable records of what one collection saw);
- `metrics`: a snapshot rendered as metric families (nvitop-exporter's names);
- `podmap`: who owns a GPU process or a GPU;
- `service`: the wiring of source, pod maps, loop and HTTP server; `cli` the command;
- `settings`: the ``GPU_EXPORTER_*`` settings; `errors` the feature's exceptions.
"""
