"""A run folder: the config and package versions of a run beside its results.

Every file is written to a temporary name and renamed into place, so a run killed at any moment
(even by ``kill -9``) leaves only whole files; a rerun with the same config skips what is there.
A rerun with a different config is refused rather than mixed into old results.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

PACKAGES = ("alignlib", "torch", "transformers", "numpy", "pandas", "scikit-learn", "datasets")


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages that shape the numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sha1(obj) -> str:
    """A stable digest of anything JSON can write (configs, id lists, token ids)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        binary = isinstance(data, bytes)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunFolder:
    """A folder holding ``config.json``, ``versions.json`` and result tables (exact-float CSV)."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            if old != self.config:
                changed = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise ValueError(f"run folder {self.path} holds a run with another config (differs in {changed}); "
                                 "use a new folder or delete it")
        else:
            write_atomic(cfg_file, json.dumps(self.config, indent=2, sort_keys=True))
        write_atomic(self.path / "versions.json", json.dumps(versions(), indent=2, sort_keys=True))

    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.csv"

    def has(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def save(self, name: str, table: pd.DataFrame) -> Path:
        path = self.table_path(name)
        write_atomic(path, table.to_csv(index=False, float_format="%.17g"))
        return path

    def load(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.table_path(name))
