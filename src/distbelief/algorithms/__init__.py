"""The training algorithms, each a package (config, messages, driver, actors) that registers
itself in the registry (``registry.py``); ``api.train`` and the command look an algorithm up
by name and name none. The skeleton every algorithm's driver shares is ``driver.py``."""

# Each package registers itself on import; this line is all a new algorithm adds here.
from . import downpour, sandblaster  # noqa: F401
from .registry import Algorithm, get, names, refuse_others, register, require

__all__ = ["Algorithm", "get", "names", "refuse_others", "register", "require"]
