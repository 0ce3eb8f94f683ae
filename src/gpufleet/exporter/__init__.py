"""The GPU exporter: Prometheus metrics per GPU and per GPU process, with pod attribution.

Collection runs in a background loop into immutable snapshots; `/metrics` renders
the latest snapshot through a custom Collector, so a scrape never touches NVML,
/proc or the Kubernetes API.
"""
