"""The demo's stage runner: finished stages are reused, changed or unfinished ones (and what follows) rerun."""

from __future__ import annotations

import json

from diffalign.demo import DISTRIBUTION, MODELS, REWARDS, Stage, build_stages, run_stages, split_prompts


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
    assert [s.name for s in stages] == ["pairs", "mapo", "dpo", "selfnpo", "samples", "report"]
    assert list(MODELS) == ["base", "mapo", "dpo", "base+selfnpo", "mapo+selfnpo"]
    from diffalign.evaluation import get_reward

    assert [get_reward(spec).name for spec in REWARDS] == [  # every spec the report uses builds
        "toy:shape_colour_correct", "toy:clarity", "toy:style_striped"]
    from diffalign.evaluation.toy_distribution import build_distribution

    assert build_distribution(DISTRIBUTION).references_per_image == 4
