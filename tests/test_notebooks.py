"""The notebooks' contracts: paired text and .ipynb in sync, a documented parameters cell, checked cells.

nbval itself re-executes every committed notebook (``--nbval-lax``, configured in pyproject.toml);
these tests keep the files it runs honest.
"""

import ast
import json
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9A][0-9]_*.md"))
REQUIRED = {"base", "tuned", "data", "rows", "seed", "device", "dtype", "run_dir"}


def test_every_notebook_is_there():
    assert [p.stem for p in SOURCES] == ["01_pair_and_data", "02_patching", "03_lasso", "04_low_rank", "05_probes",
                                        "06_validation", "07_windows", "08_own_change", "09_transfer_steering",
                                        "10_training", "A1_dpo_builds"]


def _code(nb):
    return [(c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_text_and_ipynb_are_in_sync(md):
    """What ``jupytext --sync`` would keep: the same cells, sources and tags on both sides."""
    ipynb = md.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `make book`"
    text, paired = jupytext.read(md), nbformat.read(ipynb, as_version=4)
    assert _code(text) == _code(paired), f"{md.name} and {ipynb.name} differ: run `make book`"
    assert [c.source.strip() for c in text.cells if c.cell_type == "markdown"] == \
           [c.source.strip() for c in paired.cells if c.cell_type == "markdown"]
    assert "papermill" not in paired.metadata
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in paired.cells)


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_parameters_cell_is_first_and_documented(md):
    nb = jupytext.read(md)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    tree = ast.parse(first.source)
    names = []
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{md.name}: parameters must be `name: type = literal`"
        ast.literal_eval(node.value)  # literals only
        names.append(node.target.id)
    assert REQUIRED <= set(names), f"{md.name}: missing {REQUIRED - set(names)}"
    lines = [l for l in first.source.splitlines() if l.strip()]
    assert all("  # " in l for l in lines), f"{md.name}: every parameter needs a help comment"
    params = papermill.inspect_notebook(str(md.with_suffix(".ipynb")))
    assert set(params) == set(names)
    assert all(p["help"] and p["inferred_type_name"] != "None" for p in params.values())


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.stem)
def test_each_notebook_has_a_checked_cell_and_an_answer(md):
    nb = jupytext.read(md)
    checked = [c for c in nb.cells if "nbval-check-output" in c.metadata.get("tags", [])]
    assert checked, f"{md.name}: no cell tagged nbval-check-output"
    headings = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert "**Question.**" in headings[0] and any(h.startswith("## Answer") for h in headings)


def test_reference_outputs_hold_no_errors():
    for ipynb in NOTEBOOKS.glob("[0-9A][0-9]_*.ipynb"):
        for cell in json.loads(ipynb.read_text())["cells"]:
            for out in cell.get("outputs", []):
                assert out["output_type"] != "error", f"{ipynb.name} holds an error output"


def test_every_figure_has_a_caption():
    for ipynb in NOTEBOOKS.glob("[0-9A][0-9]_*.ipynb"):
        for cell in json.loads(ipynb.read_text())["cells"]:
            if any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
                caption = cell["metadata"].get("mystnb", {}).get("figure", {}).get("caption")
                assert caption, f"{ipynb.name}: a figure without a caption:\n{''.join(cell['source'])[:200]}"


def test_nbval_runs_a_second_arithmetic_path():
    """The session's kernels (conftest) compute on another floating-point path than `make reference`
    did, so nbval's checked facts are shown to hold under both: here the switch really changes the bits."""
    import os
    import subprocess
    import sys

    code = ("import torch; torch.manual_seed(0); a, b = torch.randn(48, 576), torch.randn(576, 1536); "
            "print((a @ b).softmax(-1).double().sum().item().hex())")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    session = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default"
    assert default.stdout != session.stdout, "the second arithmetic path gives the same bits: it is not a second path"


def test_glue_figure_pastes_an_inline_png_and_closes_the_figure(monkeypatch):
    """What the landing page pastes from notebooks 2 and 6: an <img> holding the PNG itself."""
    import base64
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignlib import notebook

    glued = {}
    monkeypatch.setattr(notebook, "glue", lambda name, value, display=False: glued.setdefault(name, value))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    notebook.glue_figure("fig_test", fig, alt="a title")
    html = glued["fig_test"].data
    assert html.startswith('<img alt="a title"')
    png = base64.b64decode(re.search(r"base64,([^\"]+)", html).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not plt.fignum_exists(fig.number)
