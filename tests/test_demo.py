"""The demo's stage runner: finished stages are reused, changed or unfinished ones (and what follows) rerun."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from diffalign.demo import DISTRIBUTION, LORA, MODELS, REWARDS, TRAIN, Stage, build_stages, run_stages, split_prompts
from diffalign.toy.paths import toy_pairs_path


def _stages(calls: list[str], settings: dict | None = None) -> list[Stage]:
    def body(name):
        def run(folder):
            calls.append(name)
            folder.mkdir(parents=True)
            (folder / "out.txt").write_text(name)
            return {"made": name}

        return run

    settings = settings or {}
    return [
        Stage("a", "first", settings.get("a", {"x": 1}), body("a")),
        Stage("b", "second", settings.get("b", {"y": 1}), body("b"), ("a",)),
        Stage("c", "independent", settings.get("c", {"z": 1}), body("c")),
    ]


def test_finished_stages_are_reused(tmp_path):
    calls: list[str] = []
    first = run_stages(_stages(calls), tmp_path, log=lambda *_: None)
    assert calls == ["a", "b", "c"] and not any(s["reused"] for s in first.values())
    calls.clear()
    second = run_stages(_stages(calls), tmp_path, log=lambda *_: None)
    assert calls == [] and all(s["reused"] for s in second.values())
    assert second["b"]["made"] == "b"


def test_changed_settings_rerun_the_stage_and_its_dependants_only(tmp_path):
    calls: list[str] = []
    run_stages(_stages(calls), tmp_path, log=lambda *_: None)
    calls.clear()
    run_stages(_stages(calls, {"a": {"x": 2}}), tmp_path, log=lambda *_: None)
    assert calls == ["a", "b"]  # c does not depend on a


def test_unfinished_stage_folder_is_started_again(tmp_path):
    calls: list[str] = []
    run_stages(_stages(calls), tmp_path, log=lambda *_: None)
    (tmp_path / "b" / "stage.json").unlink()  # as if killed before the stage finished
    (tmp_path / "b" / "partial.bin").write_text("half")
    calls.clear()
    run_stages(_stages(calls), tmp_path, log=lambda *_: None)
    assert calls == ["b"]
    assert not (tmp_path / "b" / "partial.bin").exists()
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["summary"] == {"made": "b"}


def test_demo_plan_holds_out_its_evaluation_prompts(tmp_path):
    train, heldout = split_prompts()
    assert len(train) == 16 and len(heldout) == 8 and not set(train) & set(heldout)
    stages = build_stages(tmp_path)
    assert list(MODELS) == ["base", "mapo", "dpo", "base+selfnpo", "mapo+selfnpo"]
    assert [s.name for s in stages] == ["pairs", "mapo", "dpo", "selfnpo", *(f"samples/{m}" for m in MODELS), "report"]
    needs = {s.name: set(s.needs) for s in stages}
    assert needs["samples/base"] == set() and needs["samples/mapo+selfnpo"] == {"mapo", "selfnpo"}
    assert needs["samples/base+selfnpo"] == {"selfnpo"} and needs["report"] == {f"samples/{m}" for m in MODELS}
    from diffalign.evaluation import get_reward

    assert [get_reward(spec).name for spec in REWARDS] == [  # every spec the report uses builds
        "toy:shape_colour_correct", "toy:clarity"]
    from diffalign.evaluation.toy_distribution import build_distribution

    assert build_distribution(DISTRIBUTION).references_per_image == 4


def test_shipped_pairs_are_ranked_on_training_prompts_only():
    import pyarrow.parquet as pq

    train, heldout = split_prompts()
    folder = toy_pairs_path()
    summary = json.loads((folder / "summary.json").read_text())
    rows = pq.read_table(sorted(folder.rglob("*.parquet"))).to_pylist()
    assert len(rows) == summary["pairs"] > 0
    captions = {row["caption"] for row in rows}
    assert captions <= set(train) and not captions & set(heldout)  # the demo's held-out prompts stay unseen


# Keys of a config that set how training goes; the rest (where to write, how often to save or validate, which
# prompts to validate on, the data path the user passes) may differ in the demo.
_BOOKKEEPING = {"output_dir", "dataset_name", "checkpointing_steps", "checkpoints_total_limit", "validation_prompts",
                "validation_steps", "max_train_steps"}


@pytest.mark.parametrize("method,config,steps", [("mapo", "toy_mapo.yaml", 300), ("dpo", "toy_dpo.yaml", 300),
                                                 ("selfnpo", "toy_selfnpo.yaml", 150)])
def test_demo_trains_the_measured_recipes_of_configs(method, config, steps):
    import yaml

    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / config).read_text())
    demo = {**LORA, **TRAIN[method]}
    differing = {k: (v, demo.get(k)) for k, v in recipe.items()
                 if k not in _BOOKKEEPING and k != "pretrained_model_name_or_path" and demo.get(k) != v}
    assert differing == {}
    assert demo["max_train_steps"] == steps and recipe["pretrained_model_name_or_path"] == "toy"


@pytest.mark.slow
def test_shipped_pairs_are_what_their_config_makes(tmp_path):
    """The first units of configs/pairs/toy_ranked_fidelity.yaml, sampled again here, give the shipped rows
    byte for byte: the shipped pairs are the toy model's own samples, ranked by the toy judge."""
    import pyarrow.parquet as pq

    from diffalign.config_loader import load_config
    from diffalign.generation import PairsConfig, run_pairs

    units = 4
    config = Path(__file__).parents[1] / "configs" / "pairs" / "toy_ranked_fidelity.yaml"
    cfg = load_config(PairsConfig, config, [f"--num_pairs={units}", f"--output_dir={tmp_path / 'again'}"]).validate()
    run_pairs(cfg)
    columns = ["caption", "jpg_0", "jpg_1", "seed_0", "seed_1", "score_0", "score_1", "pair_index"]
    again = pq.read_table(sorted((tmp_path / "again").rglob("*.parquet")), columns=columns).to_pylist()
    shipped = pq.read_table(sorted(toy_pairs_path().rglob("*.parquet")), columns=columns).to_pylist()
    shipped = [row for row in shipped if row["pair_index"] < units]
    assert len(again) == len(shipped) >= 2
    assert again == shipped


def _threads_given(lines: list[str]) -> dict[str, int]:
    """Stage title -> the torch threads the parent's start line gave it."""
    found = (re.search(r"\] (.+?) \.\.\. \(worker \d+, (\d+) thread\(s\); its output: ", line) for line in lines)
    return {m.group(1): int(m.group(2)) for m in found if m}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "(Z)" not in Path(f"/proc/{pid}/stat").read_text()[:100]


def test_stages_run_in_workers_side_by_side_where_they_wait_for_nothing(tmp_path):
    from demo_stage_child import file_stages, launcher

    lines: list[str] = []
    summaries = run_stages(file_stages(tmp_path), tmp_path, log=lines.append, jobs=2, launch=launcher(tmp_path))
    pids = {name: int((tmp_path / name / "pid.txt").read_text()) for name in "abc"}
    assert os.getpid() not in pids.values() and len(set(pids.values())) == 2  # 3 stages, 2 workers
    assert {k: v["made"] for k, v in summaries.items()} == {"a": "a", "b": "b", "c": "c"}
    started = [line for line in lines if " ... (worker " in line]
    assert len(started) == 3 and "1 thread(s)" in started[0] and "1 thread(s)" in started[1]  # a and c side by side
    given = _threads_given(lines)
    for name, title in zip("abc", ("first", "second", "independent")):  # torch in the worker got what the line says
        assert int((tmp_path / name / "threads.txt").read_text()) == given[title]
        assert (tmp_path / name / "omp.txt").read_text() == "1"  # numpy/BLAS single-threaded in every worker
    position = {line.split("] ")[1].split(" ...")[0].split(":")[0] + (" done" if ": done" in line else ""): k
                for k, line in enumerate(lines)}
    assert position["first done"] < position["second"]  # b starts only once a is finished
    assert not any(_alive(pid) for pid in pids.values())  # the workers stopped with the demo
    again = run_stages(file_stages(tmp_path), tmp_path, log=lambda *_: None, jobs=2, launch=launcher(tmp_path))
    assert all(s["reused"] for s in again.values())  # what the workers wrote is reused like a stage run here


def test_two_workers_run_each_of_four_stages_once(tmp_path):
    from demo_stage_child import flat_stages, launcher

    summaries = run_stages(flat_stages(tmp_path), tmp_path, log=lambda *_: None, jobs=2,
                           launch=launcher(tmp_path, kind="flat"))
    names = [f"s{k}" for k in range(1, 5)]
    assert sorted((tmp_path / "runs.txt").read_text().split()) == names  # every stage exactly once
    pids = {int((tmp_path / name / "pid.txt").read_text()) for name in names}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes over four stages
    assert [summaries[n]["made"] for n in names] == names
    assert not any(_alive(pid) for pid in pids)


def test_a_stage_that_fails_in_its_worker_stops_the_demo_with_its_log(tmp_path):
    from demo_stage_child import file_stages, launcher

    from diffalign.errors import UserError

    start = time.monotonic()
    with pytest.raises(UserError, match=r"(?s)the demo stage 'c' failed in worker \d; the end of .*c\.log:\n.*"
                                        r"RuntimeError: stage c broke"):
        run_stages(file_stages(tmp_path, fail="c", sleep={"a": 30}), tmp_path, log=lambda *_: None, jobs=2,
                   launch=launcher(tmp_path, fail="c", sleep={"a": 30}))
    assert time.monotonic() - start < 20  # a's worker was stopped, not waited for
    assert int((tmp_path / "a" / "pid.txt").read_text()) != int((tmp_path / "c" / "pid.txt").read_text())
    assert not any((tmp_path / name / "stage.json").exists() for name in "ac") and not (tmp_path / "b").exists()
    assert not any(_alive(int((tmp_path / name / "pid.txt").read_text())) for name in "ac")


def test_a_worker_killed_mid_stage_stops_the_demo_and_leaves_no_worker(tmp_path):
    from demo_stage_child import crash_stages, launcher

    from diffalign.errors import UserError

    start = time.monotonic()
    with pytest.raises(UserError, match=r"(?s)the demo stage 'boom' failed: its worker \d died \(exit -9\); the end "
                                        r"of .*boom\.log:\n.*fd 2 of boom"):
        run_stages(crash_stages(tmp_path), tmp_path, log=lambda *_: None, jobs=2, launch=launcher(tmp_path, kind="crash"))
    assert time.monotonic() - start < 30  # not the minute the other stage sleeps
    pids = [int((tmp_path / name / "pid.txt").read_text()) for name in ("slow", "boom")]
    assert pids[0] != pids[1] and not any(_alive(pid) for pid in pids)
    assert not (tmp_path / "slow" / "stage.json").exists()


def _children() -> list[int]:
    """Processes whose parent is this one (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def test_an_interrupted_demo_stops_its_workers(tmp_path):
    from demo_stage_child import file_stages, launcher

    workers: list[int] = []

    def log(line: str) -> None:
        if "first: done" in line:  # c still sleeps in the other worker: Ctrl-C now
            workers.extend(_children())
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_stages(file_stages(tmp_path, sleep={"c": 30}), tmp_path, log=log, jobs=2,
                   launch=launcher(tmp_path, sleep={"c": 30}))
    assert time.monotonic() - start < 20
    assert len(workers) == 2 and not any(_alive(pid) for pid in workers)
    assert not (tmp_path / "c" / "stage.json").exists() and not (tmp_path / "b").exists()


def test_each_stage_output_goes_to_its_own_log_c_level_included(tmp_path):
    from demo_stage_child import file_stages, launcher

    run_stages(file_stages(tmp_path), tmp_path, log=lambda *_: None, jobs=2, launch=launcher(tmp_path))
    pids = [int((tmp_path / name / "pid.txt").read_text()) for name in "abc"]
    assert len(set(pids)) == 2  # so one worker ran two of the stages, one after the other
    for name in "abc":
        text = (tmp_path / f"{name}.log").read_text()
        for what in ("python stdout of", "fd 1 of", "fd 2 of", "C printf of"):
            assert f"{what} {name}\n" in text
        assert not any(f" of {other}\n" in text for other in "abc" if other != name)


def test_demo_cli_has_hidden_worker_and_only_stage_flags(capsys):
    from diffalign.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--out", "o", "--worker"])
    assert args.worker and args.only_stage is None
    assert parser.parse_args(["demo", "--only-stage", "mapo"]).only_stage == "mapo"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    shown = capsys.readouterr().out
    assert "--jobs" in shown and "--worker" not in shown and "--only-stage" not in shown
