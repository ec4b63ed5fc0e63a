"""Console output every stage shares (tokenization is the stage all others may import): progress bars, and
reports shown once.

Messages use :mod:`logging` under the ``"atlasformer"`` logger, whose level ``atlasformer.settings.verbosity``
(CLI ``-q`` / ``-v``) sets; the bars follow the same level, so this module needs nothing from the root package.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

IN_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
"""tqdm.auto chose Jupyter widgets."""
PIPE_REFRESH_SECONDS = 5.0
"""Least time between two redraws of a bar writing to a pipe or a log file, so the log is not flooded."""

_shown: set[str] = set()


def is_main_process() -> bool:
    """True outside multi-process launches, and on rank 0 of one (torchrun / accelerate set ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


def progress_bar(total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0,
                 main_process: bool | None = None) -> tqdm:
    """A ``tqdm.auto`` bar (a widget in notebooks, text elsewhere) on stderr, shown at verbosity 1 or more.

    Parameters
    ----------
    total
        Units of work, if known.
    desc
        What the bar counts, shown before it.
    unit
        Name of one unit ("cells", "step").
    initial
        Units already done (a resumed run).
    main_process
        Whether this process draws bars (default: :func:`is_main_process`); other ranks stay silent.

    Returns
    -------
    tqdm
        The bar (disabled when quiet or not the main process). In a pipe or log file it redraws every
        :data:`PIPE_REFRESH_SECONDS` at most.
    """
    main_process = is_main_process() if main_process is None else main_process
    shown = main_process and logging.getLogger("atlasformer").isEnabledFor(logging.INFO)
    live = IN_NOTEBOOK or sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not shown, dynamic_ncols=live,
                mininterval=0.1 if live else PIPE_REFRESH_SECONDS)


def log_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` at info level the first time this process shows it, at debug level after.

    Pretraining and every fine-tuned head tokenize the same file; its report repeated five times would hide
    the lines that differ.
    """
    if message in _shown or not logger.isEnabledFor(logging.INFO):
        logger.debug(message)
        return
    _shown.add(message)
    logger.info(message)
