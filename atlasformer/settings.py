"""How much atlasformer tells you while it works: ``atlasformer.settings.verbosity``.

Every module logs through the standard :mod:`logging` module under the ``"atlasformer"`` logger, and progress
bars follow that logger's level. ``verbosity`` sets it:

- ``0``: warnings only, no progress bars (the CLI's ``-q``);
- ``1``: progress messages and bars (the default);
- ``2``: debug messages too (the CLI's ``-v``).

>>> import atlasformer.settings
>>> atlasformer.settings.verbosity = 0

Messages reach the console through one handler on the ``"atlasformer"`` logger, writing plain lines to stderr
(installed once, when the package is imported). They do not propagate to the root logger: a library that calls
``logging.basicConfig`` (or ``logging.info`` at module level, which does so) would print each line twice. To route
them through your application's logging instead, remove that handler and set
``logging.getLogger("atlasformer").propagate = True``.
"""

from __future__ import annotations

import logging
import sys
import types

LOGGER_NAME = "atlasformer"
LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
DEFAULT_VERBOSITY = 1


class ConsoleHandler(logging.Handler):
    """Plain ``%(message)s`` lines to the current ``sys.stderr``, through ``tqdm.write``.

    ``sys.stderr`` is looked up per message, so redirected or captured streams (notebooks, pytest) receive it;
    ``tqdm.write`` moves an open progress bar below the line instead of breaking it.
    """

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def install_console_handler() -> logging.Logger:
    """Give the ``"atlasformer"`` logger its console handler and the default level, once (idempotent).

    Returns
    -------
    logging.Logger
        The ``"atlasformer"`` logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, ConsoleHandler) or type(h).__name__ == "ConsoleHandler" for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
        logger.propagate = False  # printed here once, not again by a root handler someone else configured
    if logger.level == logging.NOTSET:  # a level the application set stays
        logger.setLevel(LEVELS[DEFAULT_VERBOSITY])
    return logger


def set_verbosity(verbosity: int) -> None:
    """Set the ``"atlasformer"`` logger's level: 0 warnings only, 1 info (default), 2 debug.

    Parameters
    ----------
    verbosity
        0, 1 or 2.
    """
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity must be 0 (warnings only), 1 (info) or 2 (debug), not {verbosity!r}")
    install_console_handler().setLevel(LEVELS[verbosity])


def get_verbosity() -> int:
    """The verbosity the ``"atlasformer"`` logger's level amounts to (0, 1 or 2)."""
    level = logging.getLogger(LOGGER_NAME).getEffectiveLevel()
    return 2 if level <= logging.DEBUG else 1 if level <= logging.INFO else 0


class _SettingsModule(types.ModuleType):
    """Makes ``atlasformer.settings.verbosity = 0`` set the logger level (a module attribute cannot do that)."""

    @property
    def verbosity(self) -> int:
        return get_verbosity()

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        set_verbosity(value)


sys.modules[__name__].__class__ = _SettingsModule
install_console_handler()
