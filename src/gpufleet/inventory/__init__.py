"""GPU inventory: which physical GPU sat in which node and machine, and when.

Where things are:

- ``reading.py``: the reading (one GPU in one machine at one time).
- ``local.py`` (scan this machine), ``controller.py`` (nvidia-smi in each
  device-plugin pod), ``check.py`` (check mode), ``podwork.py`` and
  ``workqueue.py`` (watching pods, once per UID, on the leader),
  ``service.py`` (the long-running commands), ``cli.py``.
- Delivery: ``wiring.py`` builds one per exporter; ``delivery.py`` (the
  spooled pipeline and the ``Delivery`` face), ``outcomes.py`` (what each
  finished write means for spool, metrics and log), ``spool.py`` (the SQLite
  spool), ``deadletter.py`` (the dead-letter file), ``direct.py`` (local
  sinks written straight through).
- ``exporters/``: stdout, sqlite, http, ``postgres/`` and ``s3/`` behind one
  ``Exporter`` interface; ``history.py`` answers where GPUs have been.
- ``config.py`` (settings), ``metrics.py``, ``errors.py``.
"""

from gpufleet.inventory.reading import Reading, readings_from_devices

__all__ = ["Reading", "readings_from_devices"]
