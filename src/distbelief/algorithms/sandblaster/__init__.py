"""Sandblaster L-BFGS: a coordinator drives L-BFGS through vector operations on the parameter
server shards; replicas compute gradients of small portions, load-balanced, with backups."""

from ..registry import Algorithm, register
from . import prepare
from .config import SandblasterConfig
from .driver import OPTIONS, run

register(
    Algorithm(
        name="sandblaster",
        config=SandblasterConfig,
        run=run,
        configure=prepare.configure,
        memory=prepare.memory,
        check=prepare.check,
        resume=prepare.resume,
        title="Sandblaster",
        takes=prepare.TAKES,
        options=OPTIONS,
    )
)
