"""distbelief: Google's DistBelief (Dean et al., NIPS 2012) on PyTorch.

Downpour SGD: asynchronous model replicas, each split by layer into stages, reading and
updating a sharded parameter server; Sandblaster L-BFGS: a coordinator running L-BFGS over the
same shards on scalars, replicas computing gradients of portions. See :func:`train`.
"""

from .algorithms.downpour.config import DownpourConfig
from .algorithms.sandblaster.config import SandblasterConfig
from .api import LOSSES, train
from .core.layout import Layout, Segment
from .errors import (
    ActorFailed,
    ConfigError,
    DataChanged,
    Deadlock,
    NothingToTrain,
    RunTimeout,
    TrainingDiverged,
    TrainingInterrupted,
)
from .nn import LocallyConnected1d, LocallyConnected2d
from .results import History, TrainResult

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "ActorFailed",
    "ConfigError",
    "Deadlock",
    "DownpourConfig",
    "History",
    "Layout",
    "LocallyConnected1d",
    "LocallyConnected2d",
    "NothingToTrain",
    "RunTimeout",
    "SandblasterConfig",
    "Segment",
    "TrainResult",
    "TrainingDiverged",
    "DataChanged",
    "TrainingInterrupted",
    "train",
]
