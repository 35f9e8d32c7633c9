"""What a run trains on: in-memory tensors (tensors), what train() accepts as data (inputs),
the bundled datasets (datasets), how examples are split over replicas (sharding), and data
files (formats: one module per format).

The names below are the data layer's public surface, as ``distbelief.data`` always offered them
(``from distbelief.data import mnist1d, files``)."""

from . import inputs
from .inputs import *  # noqa: F403  (the names inputs.__all__ lists)

__all__ = list(inputs.__all__)
