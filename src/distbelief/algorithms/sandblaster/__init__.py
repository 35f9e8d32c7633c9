"""Sandblaster L-BFGS: a coordinator drives L-BFGS through vector operations on the parameter
server shards; replicas compute gradients of small portions, load-balanced, with backups."""

from .. import Algorithm, register
from .config import SandblasterConfig

register(Algorithm(name="sandblaster", config=SandblasterConfig))
