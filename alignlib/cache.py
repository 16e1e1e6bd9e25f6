"""Where alignlib keeps what it builds (converted weights, tuned models), and how it writes there.

Everything is written to a temporary folder and renamed into place, so an interrupted build
never leaves a half-written entry that a later load would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "ALIGNLIB_CACHE"


def cache_dir() -> Path:
    """``$ALIGNLIB_CACHE``, else ``$XDG_CACHE_HOME/alignlib``, else ``~/.cache/alignlib``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignlib"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a fresh temporary folder that replaces ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
