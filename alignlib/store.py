"""The one store: everything alignlib keeps between runs, keyed by its config and the code that computes it.

Converted weights, tuned models, cached notebook steps, resumable sweeps and executed-notebook stamps
are all entries: a folder named by what it holds and a key, the digest of its config and of the source
of the code that computes it. An entry is reused only when both match; one made by other code is
recomputed with a one-line notice. Every file is written to a temporary name and renamed into place,
so a run killed at any moment (even by ``kill -9``) leaves only whole files.

Values are read back without executing code: JSON, NumPy arrays (``allow_pickle=False``), Parquet
tables, and alignlib's own result dataclasses rebuilt from their fields. Nothing is pickled, so a
store someone else wrote can be read safely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

CACHE_ENV = "ALIGNLIB_CACHE"
PACKAGES = ("alignlib", "torch", "transformers", "numpy", "pandas", "scikit-learn", "scipy", "datasets")
PACKAGE_ROOT = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """``$ALIGNLIB_CACHE``, else ``$XDG_CACHE_HOME/alignlib``, else ``~/.cache/alignlib``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignlib"
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


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


def code_digest(*parts) -> str:
    """A digest of the code that computes an entry: alignlib modules (by name) or functions (by source).

    No parts: every module of alignlib. A result computed by other code has another digest.
    """
    h = hashlib.sha1()
    if not parts:
        for f in sorted(PACKAGE_ROOT.rglob("*.py")):
            h.update(f.read_bytes())
        return h.hexdigest()
    for part in parts:
        if isinstance(part, str):
            h.update((PACKAGE_ROOT / (part.replace(".", "/") + ".py")).read_bytes())
        else:
            h.update(inspect.getsource(part).encode())
    return h.hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


class StoreError(ValueError):
    """An entry cannot be used: another config in a folder the user named, or unreadable contents."""


class Entry:
    """One entry of a store: a folder with ``entry.json`` (config, code digest, versions) beside its files."""

    def __init__(self, path: Path, config: dict, code: str):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        self.code = code

    @property
    def record_file(self) -> Path:
        return self.path / "entry.json"

    def record(self) -> dict | None:
        try:
            return json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return None

    def matches(self) -> bool:
        rec = self.record()
        return rec is not None and rec.get("config") == self.config and rec.get("code") == self.code

    def open(self, *, strict_config: bool = True) -> "Entry":
        """Make the folder ready for incremental writes (chunks of a resumable run).

        A folder holding the same config from other code is emptied with a notice; one holding
        another config raises `StoreError` when ``strict_config`` (a run folder the user named must
        not mix two runs), else it is emptied too.
        """
        rec = self.record()
        if rec is not None and not self.matches():
            if rec.get("config") != self.config and strict_config:
                changed = sorted(k for k in set(rec.get("config", {})) | set(self.config)
                                 if rec.get("config", {}).get(k) != self.config.get(k))
                raise StoreError(f"run folder {self.path} holds a run with another config (differs in {changed}); "
                                 "use a new folder or delete it")
            _notice(f"{self.path.name} was computed by other code; recomputing it")
            shutil.rmtree(self.path)
        if not self.record_file.is_file():
            write_atomic(self.record_file, _json(dict(config=self.config, code=self.code, versions=versions())))
        return self

    # whole values

    def save(self, value: Any) -> None:
        """Write ``value`` as this entry's content, atomically (the folder appears whole or not at all)."""
        with atomic_dir(self.path) as tmp:
            manifest = _encode(value, tmp, [0])
            (tmp / "value.json").write_text(_json(manifest))
            (tmp / "entry.json").write_text(_json(dict(config=self.config, code=self.code, versions=versions())))

    def load(self) -> Any:
        return _decode(json.loads((self.path / "value.json").read_text()), self.path)

    # tables inside an open entry (chunks)

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.parquet").is_file()

    def save_table(self, name: str, table: pd.DataFrame) -> None:
        write_atomic(self.path / f"{name}.parquet", _parquet_bytes(table))

    def load_table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path / f"{name}.parquet")

    def part(self, name: str) -> "Entry":
        """A whole value inside this open entry (one finished chunk of a resumable run that is not a table)."""
        return Entry(self.path / name, self.config, self.code)


def shard_spec(shard, run_dir) -> tuple[int, int]:
    """(i, n) from ``shard``: None is (0, 1); ``"auto"`` reads ``RANK`` and ``WORLD_SIZE`` (torchrun,
    accelerate, a job array). Shards meet in a run folder, so n > 1 needs ``run_dir``."""
    if shard is None:
        return 0, 1
    if shard == "auto":
        shard = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: need 0 <= i < n")
    if world > 1 and run_dir is None:
        raise ValueError("a sharded run needs run_dir: the shards meet in that folder")
    return rank, world


def wait_for(ready: Callable[[], bool], where: Path, timeout: float = 24 * 3600) -> None:
    """Wait until ``ready()`` (the other shards' chunks written to ``where``)."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"shards still missing in {where} after {timeout:.0f} s")
        time.sleep(1.0)


class Store:
    """Entries under one root folder: the user cache by default, or a run folder."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else cache_dir()

    def entry(self, kind: str, name: str, config: dict, code: str | None = None) -> Entry:
        """The entry for ``name`` computed with ``config`` by ``code`` (default: all of alignlib)."""
        code = code or code_digest()
        key = sha1({"config": config, "code": code})[:12]
        return Entry(self.root / kind / f"{name}-{key}", config, code)

    def cached(self, name: str, config: dict, compute: Callable[[], Any], *, kind: str = "steps",
               code: str | None = None) -> Any:
        """``compute()``, stored with its config and code, and reused while both match."""
        entry = self.entry(kind, name, config, code)
        if entry.matches():
            try:
                return entry.load()
            except Exception as err:  # unreadable: say so and recompute, never trust it
                _notice(f"{entry.path.name} is unreadable ({type(err).__name__}); recomputing it")
        else:
            self._retire(entry, name)
        value = compute()
        entry.save(value)
        return value

    def model(self, name: str, config: dict, code: str, build: Callable, *, progress: bool = True):
        """(model, tokenizer) of entry ``name``; else ``build()`` -> (model, tokenizer, log or None), saved.

        Weights are safetensors, the tokenizer and the record JSON: nothing in a model entry runs code.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        entry = self.entry("models", name, config, code)
        if entry.matches():
            try:
                model = AutoModelForCausalLM.from_pretrained(str(entry.path), dtype="float32")
                return model.eval(), AutoTokenizer.from_pretrained(str(entry.path))
            except Exception as err:  # a corrupt entry: say so and rebuild
                _notice(f"model {entry.path.name} is unreadable ({type(err).__name__}); rebuilding it")
        else:
            self._retire(entry, name)
        if progress:
            _notice(f"building {name!r} (stored at {entry.path}); this happens once")
        start = time.perf_counter()
        model, tokenizer, log = build()
        with atomic_dir(entry.path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if log is not None:
                log.to_csv(tmp / "training_log.csv", index=False)
            record = dict(config=entry.config, code=code, versions=versions(),
                          build_seconds=round(time.perf_counter() - start, 1))
            (tmp / "entry.json").write_text(_json(record))
        return model.eval(), tokenizer

    def model_record(self, name: str, config: dict, code: str) -> dict | None:
        """The record of model entry ``name`` (config, versions, build seconds), or None if not built."""
        entry = self.entry("models", name, config, code)
        return entry.record() if entry.matches() else None

    def _retire(self, entry: Entry, name: str) -> None:
        """Remove entries of ``name`` made with another key (other config or code), with a notice."""
        for old in entry.path.parent.glob(f"{name}-*"):
            rec = Entry(old, {}, "").record()
            if old != entry.path and rec is not None and rec.get("config") == entry.config:
                _notice(f"{old.name} was computed by other code; recomputing it")
                shutil.rmtree(old, ignore_errors=True)


def _notice(text: str) -> None:
    """A one-line notice on stderr: seen on the console, never written into a rendered page."""
    print(f"alignlib: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Values as JSON + arrays + tables (no pickle)


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=_plain)


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot store {type(x).__name__}")


def _parquet_bytes(table: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    table.to_parquet(buf, index=True)
    return buf.getvalue()


def _encode(value, folder: Path, counter: list) -> Any:
    def file(ext):
        counter[0] += 1
        return f"part{counter[0]:04d}.{ext}"

    if isinstance(value, pd.DataFrame):  # Parquet wants string column names: keep the real ones beside
        name = file("parquet")
        columns = [_plain(c) if isinstance(c, np.generic) else c for c in value.columns]
        (folder / name).write_bytes(_parquet_bytes(value.set_axis([str(c) for c in columns], axis=1)))
        return {"$frame": name, "columns": columns, "columns_name": value.columns.name}
    if isinstance(value, pd.Series):
        name = file("parquet")
        (folder / name).write_bytes(_parquet_bytes(value.to_frame(name="__value__")))
        return {"$series": name, "name": value.name}
    if isinstance(value, np.ndarray):
        name = file("npy")
        np.save(folder / name, value, allow_pickle=False)
        return {"$array": name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("alignlib"):
            raise TypeError(f"only alignlib's result classes are stored, not {cls.__module__}.{cls.__name__}")
        return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name), folder, counter) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"$dict": {k: _encode(v, folder, counter) for k, v in value.items()}}
        return {"$items": [[_encode(k, folder, counter), _encode(v, folder, counter)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"$tuple" if isinstance(value, tuple) else "$list": [_encode(v, folder, counter) for v in value]}
    if value is None or isinstance(value, (str, bool, int, float, np.generic)):
        return _plain(value) if isinstance(value, np.generic) else value
    raise TypeError(f"cannot store a {type(value).__name__}")


def _decode(node, folder: Path) -> Any:
    if not isinstance(node, dict):
        return node
    if "$frame" in node:
        frame = pd.read_parquet(folder / node["$frame"])
        return frame.set_axis(pd.Index(node["columns"], name=node["columns_name"]), axis=1)
    if "$series" in node:
        return pd.read_parquet(folder / node["$series"])["__value__"].rename(node["name"])
    if "$array" in node:
        return np.load(folder / node["$array"], allow_pickle=False)
    if "$dataclass" in node:
        module, _, qualname = node["$dataclass"].partition(":")
        if not module.startswith("alignlib"):
            raise StoreError(f"refusing to rebuild {node['$dataclass']}: not an alignlib result class")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not dataclasses.is_dataclass(cls):
            raise StoreError(f"{node['$dataclass']} is not a dataclass")
        return cls(**{k: _decode(v, folder) for k, v in node["fields"].items()})
    if "$dict" in node:
        return {k: _decode(v, folder) for k, v in node["$dict"].items()}
    if "$items" in node:
        return {_decode(k, folder): _decode(v, folder) for k, v in node["$items"]}
    if "$tuple" in node:
        return tuple(_decode(v, folder) for v in node["$tuple"])
    if "$list" in node:
        return [_decode(v, folder) for v in node["$list"]]
    raise StoreError(f"unknown stored value {sorted(node)}")
