"""Issue 22: every case of the hostile corpus through the real command (in process, `diffalign.cli.main`):
a clear one-line error, a refusal that leaves the input alone, or a counted skip; never a traceback (main would
raise), never exit 0 with nothing learned, never a changed input. RELIABILITY.md's table is generated from the
same corpus (`python tests/hostile/table.py --write`)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hostile_corpus import CASES, Ctx  # noqa: E402
from table import RELIABILITY, render_table, table_in_document  # noqa: E402


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    except OSError:
        return None


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every case runs a real command (most load a model, many train): the whole corpus takes about 45 s, so it runs in
# the default test run and stays out of the `-m "not slow"` inner loop.
@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=f"d{c.defect:02d}-{c.id}") for c in CASES])
def test_hostile_case(case, tiny_pipelines, tmp_path, monkeypatch, capsys, one_thread):
    from diffalign.cli import main

    ctx = Ctx(tmp=tmp_path, model=str(tiny_pipelines["sd"]), monkeypatch=monkeypatch)
    argv = case.build(ctx)
    before = {p: _digest(p) for p in ctx.inputs}
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if case.outcome in ("error", "refused"):
        assert code == case.exit_code, err
        head = f"diffalign {argv[0]}: error: "
        assert err.count(head) == 1, err  # progress bars may come before (and a closing bar after) on stderr
        line = (head + err.split(head, 1)[1]).split("\n", 1)[0]
        assert case.expect in line, line  # the whole message is on one line
    else:
        assert code == case.exit_code, err
    after = {p: _digest(p) for p in ctx.inputs}
    assert after == before, "an input file was changed"
    if case.check is not None:
        case.check(ctx, err)


def test_reliability_table_is_generated_from_the_corpus():
    assert table_in_document(RELIABILITY.read_text()) == render_table(), \
        "RELIABILITY.md's hostile-input table differs from the corpus: run python tests/hostile/table.py --write"


def test_the_corpus_covers_all_fourteen_defects():
    assert {c.defect for c in CASES} == set(range(1, 15))
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.outcome in ("error", "refused", "skip", "ok") for c in CASES)


def test_per_step_seeds_keep_the_old_formula_where_it_fitted_and_hash_beyond():
    from diffalign.safety.seeds import step_seed

    assert step_seed(0, 3, 1, 0) == ((0 * 1_000_003 + 3) * 1009 + 1) * 101  # existing runs are unchanged
    assert step_seed(12345, 7, 0, 1) == ((12345 * 1_000_003 + 7) * 1009 + 0) * 101 + 1
    big = [step_seed(2**32 - 1, s, m, r) for s in range(3) for m in range(2) for r in range(2)]
    assert all(0 <= v < 2**63 for v in big) and len(set(big)) == len(big)


def test_fetch_failures_of_every_process_are_counted_through_the_step_reduction():
    """Two processes' sums, averaged as `sums_to_host` does under accelerate: the count is the global one, and
    every process takes the same decision."""
    import torch

    from diffalign.training.fetch_guard import METRIC, FetchFailures, add_fetch_failures

    world, per_process = 2, [[None, {"x": 1}], [None, None]]  # rank 0: one row failed, rank 1: both
    sums = [{} for _ in range(world)]
    for rank in range(world):
        add_fetch_failures(sums[rank], per_process[rank], world)
    mean = torch.stack([torch.as_tensor(s[METRIC]) for s in sums]).mean()  # accelerator.reduce(..., "mean")
    decisions = []
    for rank in range(world):
        guard = FetchFailures(0.375, rows_per_micro=2 * world, micro_per_epoch=2, ga=1, describe=lambda: "data")
        guard.record(0, {METRIC: float(mean)})
        assert (guard.failed, guard.fetched) == (3, 4)
        decisions.append(guard.check(1, last=False) is not None)
    assert decisions == [True, True]  # 3 of the epoch's 8 rows reach 0.375 x 8 on both processes
    # one process's own count (1 or 2) would not have reached it on rank 0: the merge is what stops both
    assert 1 < 0.375 * 8 <= 3
