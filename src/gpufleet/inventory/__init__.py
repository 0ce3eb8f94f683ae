"""GPU inventory: which physical GPU sat in which node and machine, and when."""

from gpufleet.inventory.reading import Reading, readings_from_devices

__all__ = ["Reading", "readings_from_devices"]
