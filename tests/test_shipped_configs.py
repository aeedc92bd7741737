"""The recipes ship inside the package: `diffalign train NAME`, `diffalign pairs pairs/NAME`, `diffalign configs`."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from diffalign.cli import main
from diffalign.config_loader import load_config
from diffalign.errors import UserError
from diffalign.generation import PairsConfig
from diffalign.shipped_configs import CONFIGS, resolve_config, shipped_configs
from diffalign.training.config import TrainConfig

ROOT = Path(__file__).parents[1]


def test_every_shipped_recipe_loads_by_name():
    names = shipped_configs()
    assert {"toy_mapo", "toy_dpo", "toy_selfnpo", "sd15_dpo", "sdxl_mapo_paper", "pairs/toy_ranked_fidelity"} <= set(names)
    for name, path in names.items():
        if name.startswith("accelerate/"):
            continue  # accelerate launch configs, not ours
        cls = PairsConfig if name.startswith("pairs/") else TrainConfig
        cfg = load_config(cls, resolve_config(name))
        assert cfg is not None and resolve_config(name + ".yaml") == str(path)
    assert (ROOT / "configs" / "toy_mapo.yaml").resolve() == (CONFIGS / "toy_mapo.yaml").resolve()  # a clone's path


def test_a_users_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("toy_mapo").write_text("method: dpo\n")
    assert resolve_config("toy_mapo") == "toy_mapo"
    with pytest.raises(UserError, match="close name: toy_mapo"):
        resolve_config("toy_mapp")


def test_train_by_name_uses_the_shipped_recipe_with_overrides():
    from diffalign.commands.train import train_config

    class Args:
        config, overrides = "toy_mapo", ["--max_train_steps=7"]

    cfg = train_config(Args)
    shipped = yaml.safe_load((CONFIGS / "toy_mapo.yaml").read_text())
    assert (cfg.method, cfg.mapo_preset, cfg.learning_rate) == (shipped["method"], shipped["mapo_preset"],
                                                                 shipped["learning_rate"])
    assert cfg.max_train_steps == 7


def test_configs_command_lists_and_shows(capsys):
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert "toy_mapo " in listing and "Toy MaPO" in listing and "pairs/toy_ranked_fidelity" in listing
    assert main(["configs", "--show", "toy_dpo"]) == 0
    assert capsys.readouterr().out == (CONFIGS / "toy_dpo.yaml").read_text()
    assert main(["configs", "--show", "nope"]) == 2


@pytest.mark.slow
def test_the_wheel_carries_the_recipes_and_the_toy_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("diffalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"diffalign/configs/toy_mapo.yaml", "diffalign/configs/pairs/toy_ranked_fidelity.yaml",
            "diffalign/toy/assets/toy-sd/model_index.json", "diffalign/toy/assets/ranked-pairs/summary.json"} <= names
