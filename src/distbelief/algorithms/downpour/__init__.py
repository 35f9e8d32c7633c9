"""Downpour SGD: asynchronous replicas, each split by layer into stages, fetching from and
pushing to a sharded parameter server."""

from .. import Algorithm, register
from .config import DownpourConfig

register(Algorithm(name="downpour", config=DownpourConfig))
