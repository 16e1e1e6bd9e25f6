"""Shared fixtures (the tiny pair, the real HH-RLHF rows beside the checkout) and the session's
arithmetic path and run folder."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The reference notebooks are written on the default arithmetic path (`make reference`); the tests,
# and the notebook kernels nbval starts from this process, run ATen's portable kernels instead, so
# a checked fact must come out the same under a second floating-point path (a different CPU, in effect).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
# The notebooks executed by nbval share one fresh store for this session (computed once, never a cache
# from before); see alignlib.notebook.start.
if "ALIGNLIB_RUN_DIR" not in os.environ:
    os.environ["ALIGNLIB_RUN_DIR"] = _SESSION_RUN_DIR = tempfile.mkdtemp(prefix="alignlib-test-run-")


def pytest_sessionfinish(session, exitstatus):
    if "_SESSION_RUN_DIR" in globals():
        shutil.rmtree(_SESSION_RUN_DIR, ignore_errors=True)
HH_DEFAULT = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


@pytest.fixture(scope="session")
def hh_file() -> Path:
    """The local copy of HH-RLHF harmless-base test rows (1,500), as CI provides it."""
    path = Path(os.environ.get("ALIGNLIB_HH_RLHF") or HH_DEFAULT)
    if not path.is_file():
        pytest.skip(f"no local HH-RLHF copy at {path}")
    return path


@pytest.fixture(scope="session")
def tiny():
    from alignlib import load_pair

    return load_pair("tiny")


@pytest.fixture(scope="session")
def builtin_prefs():
    from alignlib import load_preferences

    return load_preferences("builtin")


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(source, *args, port=...)``: run a script under torchrun with 2 CPU processes, as a user
    splits work between processes; a failure shows the processes' stderr."""
    def run(source: str, *args, port: int):
        script = tmp_path / "launched.py"
        script.write_text(source)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               str(port), str(script), *map(str, args)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return run
