"""The committed notebooks are what a fresh top-to-bottom run printed.

nbval compares outputs cell by cell, but it cannot tell that a cell was never run or
that cells ran out of order; these checks can.
"""

import json
import re
from pathlib import Path

import pytest
from nbval.plugin import find_comment_markers

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
NOTEBOOKS = sorted(p for p in CHAPTERS.glob("*.ipynb"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def test_there_are_chapters():
    assert NOTEBOOKS, f"no notebooks found in {CHAPTERS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_name(path):
    # a chapter is NN_short_name; an appendix (a research log or an aside a chapter links to) is AN_short_name
    assert re.fullmatch(r"(\d\d|A\d)_[a-z0-9_]+\.ipynb", path.name), (
        f"{path.name}: expected chapters/NN_short_name.ipynb (a chapter) or chapters/AN_short_name.ipynb (an appendix)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_in_order_without_unexpected_errors(path):
    nb = json.loads(path.read_text())
    cells = code_cells(nb)
    assert cells, f"{path.name} has no code cells"
    counts = [c["execution_count"] for c in cells]
    unexecuted = [i for i, n in enumerate(counts) if n is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} were never run; run `python book.py regenerate {path.relative_to(CHAPTERS.parent)}`"
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(cells)}: the notebook was not run top to bottom "
        "in a fresh kernel; regenerate it"
    )
    for i, cell in enumerate(cells):
        errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
        expected = "raises-exception" in cell.get("metadata", {}).get("tags", [])
        if expected:
            assert len(errors) == 1, f"{path.name}: cell {i} is tagged raises-exception but shows {len(errors)} errors"
        else:
            assert not errors, f"{path.name}: cell {i} has an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_sets_up(path):
    nb = json.loads(path.read_text())
    first = "".join(code_cells(nb)[0]["source"])
    assert "setup_notebook(" in first, f"{path.name}: the first code cell must call mllm_scratch's setup_notebook()"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel must be python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_links_to_notebooks_resolve(path):
    # a chapter that moved a section into an appendix links to it: the link must reach a notebook that exists
    nb = json.loads(path.read_text())
    prose = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    targets = re.findall(r"\]\(([^)\s#]+\.ipynb)(?:#[^)]*)?\)", prose)
    missing = [t for t in targets if not (path.parent / t).is_file()]
    assert not missing, f"{path.name} links to notebooks that do not exist: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_test_machinery_lives_in_tags(path):
    # the reader sees code, not test switches: nbval's cell tags (nbval-ignore-output,
    # raises-exception) say how a cell is checked; no # NBVAL_... comment sits in the source
    nb = json.loads(path.read_text())
    for i, cell in enumerate(code_cells(nb)):
        markers = dict(find_comment_markers("".join(cell["source"])))  # parsed exactly as nbval parses them
        assert not markers, (
            f"{path.name}: code cell {i} carries nbval comment markers {sorted(markers)}; "
            "use the cell tags nbval-ignore-output / raises-exception instead"
        )
