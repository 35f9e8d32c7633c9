"""Messages between every algorithm's driver and the actor it converses with (the master or
the coordinator)."""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- driver <-> master


@dataclass(frozen=True, slots=True)
class Begin:
    """Driver -> master: start training; the master replies to the sender when done."""
