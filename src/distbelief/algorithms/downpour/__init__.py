"""Downpour SGD: asynchronous replicas, each split by layer into stages, fetching from and
pushing to a sharded parameter server."""

from ..registry import Algorithm, register
from . import prepare
from .config import DownpourConfig
from .driver import run

register(
    Algorithm(
        name="downpour",
        config=DownpourConfig,
        run=run,
        configure=prepare.configure,
        memory=prepare.memory,
        check=prepare.check,
        resume=prepare.resume,
        title="Downpour",
        required=prepare.REQUIRED,
    )
)
