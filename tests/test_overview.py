"""The overview picture (one row per model, one column per prompt and seed) and report.html opening with it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_evaluation import Brightness, write_folder

from diffalign.errors import UserError
from diffalign.evaluation.evaluate import evaluate_folders
from diffalign.evaluation.overview import HEADER_HEIGHT, LABEL_WIDTH, PAD, matched_keys, overview_grid
from diffalign.evaluation.report import write_report


def _folders(tmp_path):
    a = write_folder(tmp_path / "A", [("a red circle", 0, 40), ("a blue square", 1, 80), ("a green diamond", 2, 120)])
    # B lacks the green diamond and has its rows in another order: only two keys are shared.
    b = write_folder(tmp_path / "B", [("a blue square", 1, 200), ("a red circle", 0, 160), ("a red circle", 7, 10)])
    return a, b


def test_overview_rows_are_models_and_columns_matched_prompt_and_seed(tmp_path):
    a, b = _folders(tmp_path)
    result = evaluate_folders({"A": a, "B": b}, [Brightness()], baseline="B", bootstrap=50)
    keys = matched_keys(result, ["A", "B"], limit=10)
    assert keys == [("a red circle", 0), ("a blue square", 1)]  # A's order, shared keys only
    c = write_folder(tmp_path / "C", [("a red circle", 0, 1), ("a red circle", 5, 2), ("a blue square", 3, 3),
                                      ("a blue square", 1, 4)])
    both = evaluate_folders({"A": a, "C": c}, [Brightness()], bootstrap=50)
    assert matched_keys(both, ["C", "A"], limit=10) == [("a red circle", 0), ("a blue square", 1)]
    three = write_folder(tmp_path / "D", [("p1", 0, 1), ("p1", 1, 1), ("p2", 2, 1), ("p2", 3, 1), ("p3", 4, 1)])
    alone = evaluate_folders({"D": three}, [Brightness()], bootstrap=50)
    assert matched_keys(alone, ["D"], limit=10, one_per_prompt=True) == [("p1", 0), ("p2", 2), ("p3", 4)]
    assert matched_keys(alone, ["D"], limit=2) == [("p1", 0), ("p1", 1)]
    path = overview_grid(result, ["A", "B"], keys, {"A": "bright", "B": "dark\nsecond line"}, tmp_path / "o.png",
                         scale=2)
    grid = np.asarray(Image.open(path).convert("RGB"))
    side = 16 * 2
    assert grid.shape == (HEADER_HEIGHT + 2 * (side + PAD), LABEL_WIDTH + 2 * (side + PAD), 3)
    # Each tile is its source image enlarged without smoothing: row B, column "a red circle" holds B's value 160.
    paths = {(r.label, r.key): r.path for r in result.records}
    for row, label, values in ((0, "A", (40, 80)), (1, "B", (160, 200))):
        for col, value in enumerate(values):
            y, x = HEADER_HEIGHT + row * (side + PAD), LABEL_WIDTH + col * (side + PAD)
            tile = grid[y : y + side, x : x + side].astype(int)
            assert abs(tile.mean() - value) < 2, (label, col)
            source = np.asarray(Image.open(paths[(label, keys[col])]).convert("RGB")).astype(int)
            assert np.array_equal(tile[::2, ::2], source) and np.array_equal(tile[1::2, 1::2], source)


def test_overview_refuses_a_missing_image(tmp_path):
    a, b = _folders(tmp_path)
    result = evaluate_folders({"A": a, "B": b}, [Brightness()], bootstrap=50)
    with pytest.raises(UserError, match="missing"):
        overview_grid(result, ["A", "B"], [("a green diamond", 2)], {}, tmp_path / "o.png")


@pytest.mark.slow
def test_report_opens_with_the_lead_picture(tmp_path):
    a, b = _folders(tmp_path)
    result = evaluate_folders({"A": a, "B": b}, [Brightness()], baseline="B", bootstrap=50)
    out = tmp_path / "report"
    out.mkdir()
    overview_grid(result, ["A", "B"], matched_keys(result, ["A", "B"], 4), {}, out / "overview.png")
    html = write_report(result, out, lead=("overview.png", "A <vs> B")).read_text()
    body = html.split("<body>", 1)[1]
    assert body.index("<figure class='lead'><img src='overview.png'") < body.index("<h2>")
    assert "A &lt;vs&gt; B" in body  # the caption is escaped
    assert "<figure" not in write_report(result, tmp_path / "plain").read_text()
