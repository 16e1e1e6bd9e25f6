"""The main job: execute every notebook with papermill, re-pair it, build the book.

    python book/main_job.py [--run-dir runs/main] [-p NAME VALUE ...] [--force] [--no-book]

1. Each ``notebooks/NN_*.md`` is converted to a notebook and executed by papermill with the given
   parameters plus ``run_dir``, so every expensive step is cached in the run folder: a re-run, or a
   run after an interruption, redoes only what is missing. A notebook whose source, parameters and
   alignlib code are unchanged since its last execution is not executed again at all.
2. The executed notebook is stripped of papermill's metadata and of its injected-parameters cell
   (the outputs are those of the notebook's own defaults plus a cache location, so nbval can
   re-execute the committed file as it stands), written to ``notebooks/NN_*.ipynb`` and re-paired
   with its ``.md`` by jupytext.
3. ``jupyter-book build`` renders the book offline with warnings as errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import papermill

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def source_digest(md: Path, parameters: dict) -> str:
    """What an executed notebook depends on: its text, its parameters, the library's code and the
    recorded benchmark results that notebooks tabulate."""
    h = hashlib.sha1(md.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True).encode())
    for f in sorted((ROOT / "alignlib").rglob("*.py")) + sorted((ROOT / "benchmarks" / "results").glob("*")):
        h.update(f.read_bytes())
    return h.hexdigest()


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop papermill's injected-parameters cell and metadata (papermill's metadata drops tags on sync)."""
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nb.metadata.pop("papermill", None)
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        cell["id"] = f"cell-{i:02d}"  # stable ids: re-execution changes outputs only
    nb.metadata["jupytext"] = {"formats": "ipynb,md:myst"}
    nbformat.validator.normalize(nb)
    return nb


def execute(md: Path, run_dir: Path, parameters: dict, force: bool) -> float:
    """Execute one notebook (unless unchanged since its last execution); return the seconds it took."""
    target = md.with_suffix(".ipynb")
    params = {**parameters, "run_dir": str(run_dir / "cache")}
    digest = source_digest(md, params)
    stamp = run_dir / "executed" / f"{md.stem}.json"
    if not force and target.exists() and stamp.exists() and json.loads(stamp.read_text())["digest"] == digest:
        print(f"{md.stem}: unchanged, not re-executed")
        return 0.0
    start = time.perf_counter()
    text = md.read_text()
    source = jupytext.reads(text, fmt="md:myst")
    tmp_in, tmp_out = run_dir / "executing" / f"{md.stem}.in.ipynb", run_dir / "executing" / f"{md.stem}.ipynb"
    tmp_in.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(source, tmp_in)
    papermill.execute_notebook(str(tmp_in), str(tmp_out), parameters=params, cwd=str(NOTEBOOKS),
                               kernel_name="python3", progress_bar=False)
    executed = clean(nbformat.read(tmp_out, as_version=4))
    if md.read_text() != text:  # edited while it ran: keep the edit, and leave it to the next run
        print(f"{md.stem}: {md.name} changed during execution; not re-paired, run again")
        return time.perf_counter() - start
    nbformat.write(executed, target)
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--sync", str(target)], check=True)
    seconds = time.perf_counter() - start
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest, "seconds": seconds, "parameters": params}, indent=2))
    print(f"{md.stem}: executed in {seconds:.0f} s")
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/main", help="run folder (cache, execution stamps)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter for every notebook (value parsed as JSON when it can be)")
    ap.add_argument("--only", nargs="*", help="notebook stems to execute (default: all)")
    ap.add_argument("--force", action="store_true", help="execute even unchanged notebooks")
    ap.add_argument("--no-book", action="store_true", help="skip the jupyter-book build")
    args = ap.parse_args(argv)
    parameters = {}
    for name, value in args.p:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value
    run_dir = (ROOT / args.run_dir).resolve()
    start = time.perf_counter()
    executed = False
    for md in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md")):
        if args.only and md.stem not in args.only:
            continue
        executed |= execute(md, run_dir, parameters, args.force) > 0
    if not args.no_book:
        # Pages that quote a notebook through glue do not know they depend on it, so after any
        # execution every page is rebuilt (--all); otherwise Sphinx's incremental build is exact.
        command = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "-W", "-n", "--keep-going"]
        subprocess.run(command + (["--all"] if executed else []), check=True, cwd=ROOT)
    print(f"main job: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
