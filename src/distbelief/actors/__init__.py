"""The actors of Downpour SGD. Thin: they route messages to pure functions and torch."""

from .data_shard import DataShard
from .downpour import DownpourMaster
from .parameter_shard import ParameterShard
from .stage import Stage

__all__ = ["DataShard", "DownpourMaster", "ParameterShard", "Stage"]
