"""Lightning callbacks of lafn_lightning: neuron location before fit, cache export after fit, progress lines."""
from .cache_export import CacheExport
from .neuron_locator import NeuronLocator
from .progress import LogProgress

__all__ = ["CacheExport", "LogProgress", "NeuronLocator"]
