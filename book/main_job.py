"""The main job: execute every notebook with papermill into the run folder, then build the book from there.

    python book/main_job.py [--run-dir runs/main] [-p NAME VALUE ...] [--only NN_name ...] [--force] [--no-book]
    python book/main_job.py --reference     # the defaults, written over the committed notebooks/*.ipynb

1. Each ``notebooks/NN_*.md`` is converted to a notebook and executed by papermill with the given
   parameters plus ``run_dir``, so every expensive step is kept in the run folder's store: a re-run,
   or a run after an interruption, redoes only what is missing. A notebook whose text, parameters,
   library code and recorded benchmark results are unchanged since its last execution is not
   executed again (its stamp is an entry of the store like any other).
2. The executed notebook is cleaned (papermill's metadata and injected-parameters cell dropped,
   stderr outputs dropped: progress bars, warnings and machine paths never reach a page) and kept
   in ``<run-dir>/executed/``. The working tree is not touched: the committed reference notebooks
   change only with ``--reference`` (``make reference``), which takes no parameters.
3. ``jupyter-book build`` renders the book offline, with warnings as errors, from a copy of the
   book's sources in which each notebook is the one just executed; the HTML lands in ``_build/html``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import papermill

from alignlib.store import Store, code_digest, sha1

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BOOK_FILES = ["_config.yml", "_toc.yml", "_static", "book", "notebooks/README.md"]


def sources() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9A][0-9]_*.md"))


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """What a committed or rendered notebook keeps: sources, tags, stdout and displays, stable ids."""
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    nb.metadata.pop("papermill", None)
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        cell["id"] = f"cell-{i:02d}"  # stable ids: re-execution changes outputs only
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nb.metadata["jupytext"] = {"formats": "ipynb,md:myst"}
    nbformat.validator.normalize(nb)
    return nb


def execute(md: Path, run_dir: Path, parameters: dict, force: bool) -> float:
    """Execute one notebook into ``run_dir/executed`` unless its stamp matches; return the seconds it took."""
    target = run_dir / "executed" / f"{md.stem}.ipynb"
    params = {**parameters, "run_dir": str(run_dir / "cache")}
    config = dict(notebook=md.name, text=sha1(md.read_text()), parameters=params,
                  results=[sha1(f.read_text()) for f in sorted((ROOT / "benchmarks" / "results").glob("*"))])
    stamp = Store(run_dir).entry("executed", md.stem, config, code_digest())
    if not force and target.exists() and stamp.matches():
        print(f"{md.stem}: unchanged since its last execution", flush=True)
        return 0.0
    start = time.perf_counter()
    print(f"{md.stem}: executing", flush=True)
    text = md.read_text()
    source = jupytext.reads(text, fmt="md:myst")
    work = run_dir / "executing"
    work.mkdir(parents=True, exist_ok=True)
    nbformat.write(source, work / f"{md.stem}.in.ipynb")
    papermill.execute_notebook(str(work / f"{md.stem}.in.ipynb"), str(work / f"{md.stem}.ipynb"), parameters=params,
                               cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=True, log_output=True)
    executed = clean(nbformat.read(work / f"{md.stem}.ipynb", as_version=4))
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(executed, target)
    seconds = time.perf_counter() - start
    stamp.save({"seconds": seconds})
    print(f"{md.stem}: executed in {seconds:.0f} s", flush=True)
    return seconds


def reference(run_dir: Path) -> None:
    """Write the executed notebooks (default parameters) over the committed ones and re-pair them."""
    for md in sources():
        executed = run_dir / "executed" / f"{md.stem}.ipynb"
        target = md.with_suffix(".ipynb")
        shutil.copyfile(executed, target)
        subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--sync", str(target)], check=True)
        print(f"{target.relative_to(ROOT)}: reference updated", flush=True)


def build_book(run_dir: Path, rebuild: bool) -> None:
    """Render the book from a copy of its sources holding the notebooks just executed."""
    site = run_dir / "site"
    for name in BOOK_FILES:
        src, dst = ROOT / name, site / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    for md in sources():
        shutil.copyfile(run_dir / "executed" / f"{md.stem}.ipynb", site / "notebooks" / f"{md.stem}.ipynb")
    command = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(site), "--path-output", str(ROOT),
               "-W", "-n", "--keep-going"]
    # pages that quote a notebook through glue do not know they depend on it: rebuild all after an execution
    subprocess.run(command + (["--all"] if rebuild else []), check=True, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/main", help="run folder (store of cached steps, executed notebooks)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter for every notebook (value parsed as JSON when it can be)")
    ap.add_argument("--only", nargs="*", help="notebook stems to execute (default: all)")
    ap.add_argument("--force", action="store_true", help="execute even unchanged notebooks")
    ap.add_argument("--no-book", action="store_true", help="skip the jupyter-book build")
    ap.add_argument("--reference", action="store_true",
                    help="execute with the default parameters and write the committed reference notebooks")
    args = ap.parse_args(argv)
    if args.reference and (args.p or args.only):
        ap.error("--reference runs every notebook with its default parameters: no -p, no --only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill streams each cell's output
    parameters = {}
    for name, value in args.p:
        try:
            parameters[name] = json.loads(value)
        except json.JSONDecodeError:
            parameters[name] = value
    run_dir = (ROOT / args.run_dir).resolve()
    start = time.perf_counter()
    times = {}
    for md in sources():
        if not args.only or md.stem in args.only:
            times[md.stem] = execute(md, run_dir, parameters, args.force)
    if args.reference:
        reference(run_dir)
    if not args.no_book:
        build_book(run_dir, rebuild=any(times.values()))
    print("\nnotebook                      seconds")
    for name, seconds in times.items():
        print(f"{name:28s} {seconds:8.0f}" if seconds else f"{name:28s}   cached")
    print(f"{'main job':28s} {time.perf_counter() - start:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
