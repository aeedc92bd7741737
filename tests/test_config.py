"""Config loader (YAML + overrides, coercion, errors, dump/load) and TrainConfig validation; shipped recipes."""

from __future__ import annotations

import dataclasses
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from diffalign.config_loader import (
    check_types,
    coerce_value,
    config_help,
    dump_config,
    load_config,
    parse_overrides,
)
from diffalign.errors import UserError
from diffalign.training.config import LR_SCHEDULERS, TrainConfig
from diffalign.training.methods import get_method, method_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml"))  # configs/accelerate/ (if any) is not a recipe


@dataclass
class Small:
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "steps"})
    flag: bool = field(default=False, metadata={"help": "a flag"})
    name: str = field(default="x", metadata={"help": "a name"})
    maybe: Optional[int] = field(default=None, metadata={"help": "optional int"})
    words: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "words"})
    nums: list[float] = field(default_factory=list, metadata={"help": "numbers"})
    mode: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "precision"})


@dataclass
class NeedsKey:
    path: str = field(metadata={"help": "required"})
    n: int = field(default=1, metadata={"help": "n"})


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def valid(**kw) -> TrainConfig:
    base = dict(method="dpo", beta=2000.0, pretrained_model_name_or_path="toy", dataset_name="d.parquet",
                output_dir="out")
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------- loading and coercion


def test_defaults_yaml_then_overrides_later_wins(tmp_path):
    p = write(tmp_path, "lr: 1.0e-3\nsteps: 5\nname: from_yaml\n")
    cfg = load_config(Small, p, ["--steps=7", "name=one", "--name", "two"])
    assert cfg == Small(lr=1e-3, steps=7, name="two")
    assert load_config(Small, None, []) == Small()
    assert load_config(Small, write(tmp_path, "", "empty.yaml"), []) == Small()


@pytest.mark.parametrize("raw,expected", [
    ("1e-6", 1e-6), ("1E-6", 1e-6), ("0.5", 0.5), ("3", 3.0), ("-2.5e3", -2500.0),
])
def test_float_coercion(raw, expected):
    assert load_config(Small, None, [f"--lr={raw}"]).lr == expected


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-6 as a string; the loader must still give a float
    assert yaml.safe_load("a: 1e-6")["a"] == "1e-6"
    assert load_config(Small, write(tmp_path, "lr: 1e-6\n"), []).lr == 1e-6


@pytest.mark.parametrize("raw,expected", [
    ("true", True), ("false", False), ("False", False), ("TRUE", True), ("yes", True), ("no", False),
    ("1", True), ("0", False), ("on", True), ("off", False),
])
def test_bool_coercion_never_python_truthiness(raw, expected):
    assert load_config(Small, None, [f"--flag={raw}"]).flag is expected


def test_bare_bool_flag_is_true_and_dashes_become_underscores():
    assert load_config(Small, None, ["--flag"]).flag is True
    assert load_config(Small, None, ["--flag", "--steps", "3"]) == Small(flag=True, steps=3)
    assert load_config(TrainConfig, None, ["--learning-rate=2e-5"]).learning_rate == 2e-5


@pytest.mark.parametrize("raw", ["maybe", "2", "1.5"])
def test_bool_rejects_other_values(raw):
    with pytest.raises(UserError, match=r"'flag'.*bool.*" + raw):
        load_config(Small, None, [f"--flag={raw}"])


def test_int_coercion():
    assert load_config(Small, None, ["--steps=12"]).steps == 12
    assert load_config(Small, None, ["--steps=2e3"]).steps == 2000
    with pytest.raises(UserError, match=r"'steps'.*expected int.*'2\.5'"):
        load_config(Small, None, ["--steps=2.5"])


@pytest.mark.parametrize("raw", ["none", "None", "null", "~"])
def test_optional_none(raw, tmp_path):
    assert load_config(Small, None, ["--maybe=4", f"--maybe={raw}"]).maybe is None
    assert load_config(Small, write(tmp_path, f"maybe: {raw}\n"), []).maybe is None
    assert load_config(Small, None, ["--maybe=4"]).maybe == 4


def test_lists_from_commas_and_yaml(tmp_path):
    assert load_config(Small, None, ["--words=x, y ,z"]).words == ("x", "y", "z")
    assert load_config(Small, None, ["--words="]).words == ()
    assert load_config(Small, None, ["--nums=1,2.5,1e-3"]).nums == [1.0, 2.5, 1e-3]
    assert load_config(Small, None, ['--words=["a, b", c]']).words == ("a, b", "c")
    from_yaml = load_config(Small, write(tmp_path, "words: [p, q]\nnums: [1, 2]\n"), [])
    assert from_yaml == Small(words=("p", "q"), nums=[1.0, 2.0])
    with pytest.raises(UserError, match=r"'nums'.*list of float"):
        load_config(Small, None, ["--nums=1,x"])
    with pytest.raises(UserError, match=r"'words'.*list of str"):
        load_config(Small, write(tmp_path, "words: 3\n"), [])


def test_literal_choices(tmp_path):
    assert load_config(Small, None, ["--mode=fp16"]).mode == "fp16"
    assert load_config(Small, None, ["--mode=BF16"]).mode == "bf16"
    # YAML 1.1 reads an unquoted `no` as False: still the choice "no"
    assert load_config(Small, write(tmp_path, "mode: no\n"), []).mode == "no"
    with pytest.raises(UserError, match=r"'mode'.*one of no, fp16, bf16.*'fp32'"):
        load_config(Small, None, ["--mode=fp32"])
    with pytest.raises(UserError, match=r"did you mean 'fp16'"):
        load_config(Small, None, ["--mode=fp61"])


def test_str_field_refuses_yaml_number(tmp_path):
    with pytest.raises(UserError, match=r"'name'.*expected str.*123.*quote"):
        load_config(Small, write(tmp_path, "name: 123\n"), [])


def test_type_error_names_key_type_value_and_source(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(Small, write(tmp_path, "lr: fast\n"), [])
    msg = str(info.value)
    assert "'lr'" in msg and "float" in msg and "'fast'" in msg and "c.yaml" in msg
    with pytest.raises(UserError, match="command line"):
        load_config(Small, None, ["--lr=fast"])


def test_unknown_key_did_you_mean(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, None, ["--learnng_rate=1e-5"])
    msg = str(info.value)
    assert "'learnng_rate'" in msg and "did you mean 'learning_rate'" in msg and "command line" in msg
    typo = r"'gradient_acumulation_steps' in '.*c\.yaml'; did you mean 'gradient_accumulation_steps'"
    with pytest.raises(UserError, match=typo):
        load_config(TrainConfig, write(tmp_path, "gradient_acumulation_steps: 2\n"), [])
    with pytest.raises(UserError, match="unknown config key 'zzzz'") as info:
        load_config(Small, None, ["zzzz=1"])
    assert "did you mean" not in str(info.value)


def test_bad_files_and_bad_overrides(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(Small, tmp_path / "missing.yaml", [])
    with pytest.raises(UserError, match="is a folder"):
        load_config(Small, tmp_path, [])
    with pytest.raises(UserError, match="must be a mapping.*list"):
        load_config(Small, write(tmp_path, "- a\n- b\n"), [])
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Small, write(tmp_path, "a: [1, 2\n"), [])
    with pytest.raises(UserError, match="needs a value"):
        load_config(Small, None, ["--steps"])
    with pytest.raises(UserError, match="--key=value"):
        load_config(Small, None, ["steps"])


def test_required_fields_are_reported():
    with pytest.raises(UserError, match=r"missing required config key\(s\) path.*--path="):
        load_config(NeedsKey, None, [])
    assert load_config(NeedsKey, None, ["--path=p"]) == NeedsKey(path="p")


def test_parse_overrides_forms():
    assert parse_overrides(["--a=1", "b=x=y", "--c", "3", "--d"], bool_keys={"d"}) == [
        ("a", "1"), ("b", "x=y"), ("c", "3"), ("d", "true")]
    assert parse_overrides(["--lr", "-1e-3"]) == [("lr", "-1e-3")]


def test_coerce_value_python_objects_are_not_parsed():
    assert coerce_value("1e-5", float) == 1e-5
    with pytest.raises(ValueError, match="expected float"):
        coerce_value("1e-5", float, parse=False)
    with pytest.raises(ValueError, match="expected bool"):
        coerce_value("False", bool, parse=False)
    with pytest.raises(UserError, match="'learning_rate'"):
        check_types(valid(learning_rate="1e-5"))


# ------------------------------------------------------------------------------------- dump, help


def _random_config(rng: random.Random) -> TrainConfig:
    return valid(
        learning_rate=rng.choice([1e-8, 2.048e-5, 0.1, 3.0]),
        train_batch_size=rng.randint(1, 64),
        use_ema=rng.random() < 0.5,
        train_mode="full",
        mixed_precision=rng.choice([None, "no", "fp16", "bf16"]),
        validation_prompts=tuple(rng.choice(["a, b", "no", "null", "1e-5", "yes", "plain"]) for _ in range(3)),
        lora_target_modules=("to_q", "to_out.0"),
        seed=rng.choice([0, 1234]),
        revision=rng.choice([None, "main", "0123456"]),
        report_to=rng.choice(["tensorboard", "wandb", "none"]),
        adam_epsilon=rng.choice([1e-8, 1e-15]),
    )


@pytest.mark.parametrize("seed", range(8))
def test_dump_then_load_round_trips(tmp_path, seed):
    cfg = _random_config(random.Random(seed))
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    assert load_config(TrainConfig, path, []) == cfg


def test_config_help_lists_every_field_with_type_default_and_help():
    text = config_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name} " in text or text.rstrip().endswith(f"--{f.name}"), f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "list of str" in text and "one of sigmoid|hinge|ipo" in text and "float or none" in text


# ------------------------------------------------------------------------------------- TrainConfig


def test_literal_types_match_module_constants():
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["lr_scheduler"]) == LR_SCHEDULERS
    assert method_names() == ("dpo", "mapo", "npo", "sft", "selfnpo")
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    from diffalign.objectives import DPO_LOSS_TYPES, MAPO_PRESETS, PairObjective

    assert typing.get_args(hints["loss_type"]) == DPO_LOSS_TYPES
    assert typing.get_args(hints["mapo_preset"]) == MAPO_PRESETS
    # Every preference method's objective is a pair objective; Self-NPO's distance is not one.
    for name in method_names():
        row = get_method(name)
        keys = row.keys(valid(method=name, beta=1000.0 if name in ("dpo", "npo") else None))
        assert isinstance(row.objective(keys), PairObjective) == row.pairs, name


def test_the_method_key_is_looked_up_in_the_table():
    assert valid(method="DPO").method == "dpo"  # `method: DPO` in a YAML file, as the choice type read it
    assert load_config(TrainConfig, None, ["--method=MaPO"]).method == "mapo"
    with pytest.raises(UserError, match=r"method=mappo is not a known method: dpo\|mapo\|npo\|sft\|selfnpo; "
                                        r"did you mean 'mapo'"):
        valid(method="mappo").validate()
    with pytest.raises(UserError, match="method=orpo is not a known method"):
        get_method("orpo")
    text = config_help(TrainConfig)  # the help of `method` is the table's
    assert all(f"{name} = " in text for name in method_names())


def test_valid_config_passes_and_derived_values():
    cfg = valid(train_batch_size=4, gradient_accumulation_steps=8, learning_rate=1e-8, scale_lr=True)
    assert cfg.validate() is cfg
    assert cfg.global_batch_size(16) == 512
    assert cfg.scaled_learning_rate(16) == pytest.approx(1e-8 * 512)
    assert valid(learning_rate=1e-5).scaled_learning_rate(8) == 1e-5
    assert cfg.section() == get_method("dpo").section(beta=2000.0, loss_type="sigmoid")
    assert get_method("dpo").needs_reference(cfg.section())


@pytest.mark.parametrize("kw,name,reads,loss", [
    (dict(method="dpo"), "dpo", "pair+reference", "dpo_loss"),
    (dict(method="npo", beta=1000.0), "npo", "pair+reference", "npo_loss"),
    (dict(method="npo", npo_objective="mapo", beta=None), "mapo", "pair", "swapped mapo_loss"),
    (dict(method="mapo", beta=None), "mapo", "pair", "mapo_loss"),
    (dict(method="mapo", mapo_preset="paper", beta=8.0), "mapo", "pair", "paper mapo_loss"),
    (dict(method="sft", beta=None), "sft", "winner", "sft_loss"),
])
def test_objective_resolution(kw, name, reads, loss):
    """The method table binds each config to its objective: which errors it reads (and so whether the reference
    runs), and the loss of objectives/ with the config's settings."""
    import torch

    from diffalign.objectives import dpo_loss, mapo_loss, npo_loss, sft_loss

    cfg = valid(**kw).validate()
    row = get_method(cfg.method)
    objective = row.objective(cfg.section())
    assert (objective.name, objective.reads) == (name, reads)
    assert row.needs_reference(cfg.section()) == (reads == "pair+reference")
    w, l, rw, rl = torch.tensor([0.1, 0.2]), torch.tensor([0.2, 0.1]), torch.tensor([0.3, 0.1]), torch.tensor([0.1, 0.1])
    expected = {"dpo_loss": lambda: dpo_loss(w, l, rw, rl, beta=2000.0),
                "npo_loss": lambda: npo_loss(w, l, rw, rl, beta=1000.0),
                "swapped mapo_loss": lambda: mapo_loss(l, w), "mapo_loss": lambda: mapo_loss(w, l),
                "paper mapo_loss": lambda: mapo_loss(w, l, preset="paper", beta=8.0), "sft_loss": lambda: sft_loss(w)}
    errors = {"winner": (w,), "pair": (w, l), "pair+reference": (w, l, rw, rl)}[reads]
    assert torch.equal(objective.loss(*errors), expected[loss]())


@pytest.mark.parametrize("kw,key", [
    (dict(method=None), "method"),
    (dict(pretrained_model_name_or_path=None), "pretrained_model_name_or_path"),
    (dict(dataset_name=None), "dataset_name"),
    (dict(output_dir=None), "output_dir"),
    (dict(train_mode="lora", rank=0), "rank"),
    (dict(lora_alpha=0.0), "lora_alpha"),
    (dict(lora_target_modules=()), "lora_target_modules"),
    (dict(beta=None), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(method="npo", beta=None), "beta"),
    (dict(method="npo", beta=0.0), "beta"),
    (dict(method="mapo", mapo_preset="paper", beta=None), "beta"),
    (dict(method="mapo", beta=8.0), "beta"),
    (dict(method="npo", npo_objective="mapo", beta=2000.0), "beta"),
    (dict(method="sft", beta=1.0), "beta"),
    (dict(method="mapo", beta=None, loss_type="hinge"), "loss_type"),
    (dict(mapo_preset="paper"), "mapo_preset"),
    (dict(npo_objective="mapo"), "npo_objective"),
    (dict(mixed_precision="fp32"), "mixed_precision"),
    (dict(lr_scheduler="warmup"), "lr_scheduler"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(train_batch_size=0), "train_batch_size"),
    (dict(max_train_steps=0), "max_train_steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(adam_beta2=1.0), "adam_beta2"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(lr_warmup_steps=100, lr_scheduler="constant"), "lr_warmup_steps"),
    (dict(lr_warmup_steps=3000, lr_scheduler="cosine"), "lr_warmup_steps"),
    (dict(checkpointing_steps=0), "checkpointing_steps"),
    (dict(checkpoints_total_limit=0), "checkpoints_total_limit"),
    (dict(resume_from_checkpoint="no/such/checkpoint-9"), "resume_from_checkpoint"),
    (dict(use_ema=True, train_mode="lora"), "use_ema"),
    (dict(ema_decay=1.0, train_mode="full"), "ema_decay"),
    (dict(resolution=30), "resolution"),
    (dict(image_columns=("jpg_0",)), "image_columns"),
    (dict(label_columns=("label_0",)), "label_columns"),
    (dict(max_train_samples=0), "max_train_samples"),
    (dict(validation_steps=0), "validation_steps"),
    (dict(validation_prompts=("ok", " ")), "validation_prompts"),
    (dict(dataloader_num_workers=-1), "dataloader_num_workers"),
])
def test_validate_names_the_key(kw, key):
    with pytest.raises(UserError, match=key):
        valid(**kw).validate()


def test_use_ema_with_lora_says_why():
    with pytest.raises(UserError, match="train_mode=full"):
        valid(use_ema=True).validate()
    valid(use_ema=True, train_mode="full").validate()


def test_resume_paths(tmp_path):
    ckpt = tmp_path / "checkpoint-500"
    ckpt.mkdir()
    assert valid(resume_from_checkpoint=str(ckpt)).validate().resolve_resume_path() == ckpt
    cfg = valid(output_dir=str(tmp_path), resume_from_checkpoint="checkpoint-500").validate()
    assert cfg.resolve_resume_path() == ckpt
    assert valid(resume_from_checkpoint="latest").validate().resolve_resume_path() is None


def test_sft_takes_one_image_column():
    valid(method="sft", beta=None, image_columns=("image",), label_columns=()).validate()


# ------------------------------------------------------------------------------------- recipes


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    for name in ("sd15_dpo", "sdxl_dpo", "sd15_mapo_official", "sdxl_mapo_official", "sdxl_mapo_paper",
                 "sd15_npo", "sdxl_npo", "sd15_sft", "toy_dpo", "toy_mapo", "toy_npo", "toy_sft"):
        assert f"{name}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path, tmp_path):
    assert path.read_text().startswith("#"), "a recipe starts with a comment saying where its numbers come from"
    cfg = load_config(TrainConfig, path, [])
    overrides = []
    if cfg.dataset_name is None:
        with pytest.raises(UserError, match="--dataset_name="):
            cfg.validate()
        overrides.append("--dataset_name=pairs.parquet")
    if cfg.output_dir is None:
        overrides.append(f"--output_dir={tmp_path}")
    cfg = load_config(TrainConfig, path, overrides).validate()
    assert cfg.method in method_names()
    assert load_config(TrainConfig, dump_config(cfg, tmp_path / "resolved.yaml"), []) == cfg


def test_recipe_numbers_match_methods_reference():
    def load(name):
        return load_config(TrainConfig, CONFIGS / f"{name}.yaml", ["--dataset_name=d"])

    assert load("sd15_dpo").beta == 2000 and load("sdxl_dpo").beta == 5000
    official = load("sdxl_mapo_official")
    assert (official.learning_rate, official.lr_scheduler, official.train_batch_size,
            official.gradient_accumulation_steps, official.max_train_steps, official.use_8bit_adam,
            official.gradient_checkpointing, official.mixed_precision, official.beta) == (
        1e-5, "constant", 8, 2, 2000, True, True, "fp16", None)
    paper = load("sdxl_mapo_paper")
    assert (paper.mapo_preset, paper.beta, paper.learning_rate, paper.lr_scheduler) == ("paper", 8, 1e-7, "cosine")
    assert paper.global_batch_size(8) == 2048
    npo = load("sd15_npo")
    assert (npo.beta, npo.rank, npo.learning_rate, npo.lr_scheduler) == (1000, 8, 5e-6, "constant")
    assert npo.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert load("sdxl_npo").beta == 2000
    for m in method_names():
        toy = load(f"toy_{m}")
        assert (toy.pretrained_model_name_or_path, toy.resolution, toy.train_mode, toy.rank) == ("toy", 32, "lora", 8)
        assert 100 <= toy.max_train_steps <= 200 and toy.method == m
