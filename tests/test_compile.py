"""torch_compile: regional compilation of the denoiser's repeated blocks (training/compile.py)."""

import pytest
import torch
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.models import load_family
from diffalign.toy.render_pairs import write_pairs_parquet
from diffalign.training.compile import compile_repeated_blocks, repeated_block_names


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_only_the_repeated_blocks_are_compiled_and_names_stay(tiny_pipelines):
    family = load_family(tiny_pipelines["sd"])
    family.add_lora(4)
    unet = family.unet
    keys = list(unet.state_dict())
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert repeated_block_names(unet) == ("BasicTransformerBlock",)
    assert compile_repeated_blocks(unet) == len(blocks) > 0
    assert all(_compiled(b) for b in blocks)
    assert not any(_compiled(m) for m in unet.modules() if type(m).__name__ != "BasicTransformerBlock")
    assert list(unet.state_dict()) == keys  # checkpoints, LoRA export and resume see the same names


def test_a_network_without_repeated_blocks_is_refused():
    with pytest.raises(UserError, match="no repeated blocks .* --torch_compile=false"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "mapo"])
def test_compiled_training_reaches_the_eager_weights(tiny_pipelines, tmp_path, method):
    from diffalign.training.config import TrainConfig
    from diffalign.training.loop import train

    data = write_pairs_parquet(tmp_path / "pairs.parquet", 8, kind="style", seed=3)
    outs = {}
    for compiled in (False, True):
        cfg = TrainConfig(method=method, pretrained_model_name_or_path=str(tiny_pipelines["sd"]), dataset_name=str(data),
                          output_dir=str(tmp_path / f"run-{compiled}"), resolution=32, train_batch_size=4,
                          max_train_steps=3, learning_rate=1e-3, rank=4, seed=0, report_to="none",
                          checkpointing_steps=1000, beta=5000.0 if method == "dpo" else None, torch_compile=compiled)
        outs[compiled] = load_file(train(cfg) / "pytorch_lora_weights.safetensors")
    eager, compiled = outs[False], outs[True]
    assert eager.keys() == compiled.keys()
    # Inductor fuses and reorders float sums, so the gradients differ in the last bits; AdamW divides by the
    # gradient's running RMS, which lets an element with a near-zero gradient move by up to about the step size.
    # So: every element within 1% of its tensor's scale, and the tensors as a whole within 0.1% on average.
    moved = 0
    for k in eager:
        scale = eager[k].abs().max().item()
        if scale == 0:
            torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-7)
            continue
        moved += 1
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-2 * scale)
        assert (compiled[k] - eager[k]).abs().mean().item() <= 1e-3 * scale, k
    assert moved > len(eager) // 2  # the weights compared are trained ones, not the zero-initialised ups alone
