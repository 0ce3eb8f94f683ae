"""The node-local device API: a Kubernetes-style GPU resource served over gRPC.

Where things are:

- The store: ``store`` (objects, the resourceVersion counter, the history
  window, fan-out), ``watcher`` (one watch's bounded queue, batches,
  bookmarks, eviction), ``events`` (a write's watch events, encoded once),
  ``validation`` (request checks), ``selector`` (label selectors),
  ``persistence`` (the optional SQLite state file).
- On the wire: ``v1alpha1`` (generated from ``proto/``), ``service`` (the
  gRPC servicer), ``server`` and ``config`` (``gpufleet device-api serve``),
  ``metrics``, ``errors`` (one class per status, the same on both sides).
- Clients: ``client`` (``DeviceApiClient``), ``informer`` (``GpuInformer``),
  ``cli`` (``gpufleet gpus ...``).
- The NVML provider: ``provider`` (the process), ``tracking`` (what it knows
  per GPU and the ``Healthy`` verdict), ``registration`` (its writes to the
  server), ``xid_events`` (the XID thread), ``health`` (merging a verdict into a
  status), ``naming`` (object names and labels), ``provider_cli``
  (``gpufleet device-api provider``).
"""
