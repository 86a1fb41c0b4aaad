"""What the entry points in ``scripts/`` share with each other: how a warning reads on the terminal."""

from __future__ import annotations

import sys
import warnings
from typing import TextIO

from tqdm import tqdm

__all__ = ["brief_warnings"]


def _show(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    kind = "" if category is UserWarning else f" ({category.__name__})"
    text = f"warning: {message}{kind}"
    out = sys.stderr if file is None else file
    tqdm.write(text, file=out)  # an open tqdm bar is redrawn below the line instead of being cut by it


def brief_warnings() -> None:
    """Print each warning as one line, ``warning: <message>`` (plus the category when it is not a plain
    ``UserWarning``), instead of Python's default of the file, line number and the ``warnings.warn(...)``
    source line under it, which tell a user of a script nothing and cut through the progress bar.

    For scripts' ``__main__`` blocks only: it replaces ``warnings.showwarning`` for the whole process.
    Filters are untouched, so ``python -W error`` still turns warnings into errors.
    """
    warnings.showwarning = _show
