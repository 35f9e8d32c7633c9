"""The actors of Downpour SGD and Sandblaster L-BFGS. Thin: they route messages to pure
functions and torch."""

from .coordinator import Coordinator
from .data_shard import DataShard
from .downpour import DownpourMaster
from .parameter_shard import ParameterShard
from .sandblaster_replica import SandblasterReplica
from .sandblaster_shard import SandblasterShard
from .stage import Stage

__all__ = [
    "Coordinator",
    "DataShard",
    "DownpourMaster",
    "ParameterShard",
    "SandblasterReplica",
    "SandblasterShard",
    "Stage",
]
