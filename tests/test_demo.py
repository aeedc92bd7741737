"""The demo's stage runner: finished stages are reused, changed or unfinished ones (and what follows) rerun."""

from __future__ import annotations

import json
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


def test_stages_run_in_processes_side_by_side_where_they_wait_for_nothing(tmp_path):
    import os

    from demo_stage_child import file_stages, launcher

    lines: list[str] = []
    summaries = run_stages(file_stages(), tmp_path, log=lines.append, jobs=2, launch=launcher(tmp_path))
    pids = {name: int((tmp_path / name / "pid.txt").read_text()) for name in "abc"}
    assert os.getpid() not in pids.values() and len(set(pids.values())) == 3  # each stage in a process of its own
    assert {k: v["made"] for k, v in summaries.items()} == {"a": "a", "b": "b", "c": "c"}
    started = [line for line in lines if "a process of its own" in line]
    assert len(started) == 3 and "1 thread(s)" in started[0] and "1 thread(s)" in started[1]  # a and c side by side
    position = {line.split("] ")[1].split(" ...")[0].split(":")[0] + (" done" if ": done" in line else ""): k
                for k, line in enumerate(lines)}
    assert position["first done"] < position["second"]  # b starts only once a is finished
    again = run_stages(file_stages(), tmp_path, log=lambda *_: None, jobs=2, launch=launcher(tmp_path))
    assert all(s["reused"] for s in again.values())  # what the processes wrote is reused like a stage run here


def test_a_stage_that_fails_in_its_process_stops_the_demo_with_its_log(tmp_path):
    from demo_stage_child import file_stages, launcher

    from diffalign.errors import UserError

    with pytest.raises(UserError, match=r"(?s)the demo stage 'c' failed in its process .*stage c broke"):
        run_stages(file_stages(), tmp_path, log=lambda *_: None, jobs=2, launch=launcher(tmp_path, fail="c"))
    assert not (tmp_path / "c" / "stage.json").exists() and not (tmp_path / "b").exists()
