"""Reward models: spec parsing, the CLIP-based rewards against their formulas, the optional-package adapters."""

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.errors import UserError
from diffalign.evaluation import get_reward, images_to_pil, parse_reward_spec
from diffalign.rewards.clip import AestheticHead

PROMPTS = ["a red circle", "a blue square", "a red circle", "", "a green striped triangle"]
IMAGE_SIZE = 32


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_tiny_clip(folder, seed=0, projection_dim=24):
    """A random-init CLIPModel with the project's offline tokenizer and a local image processor, saved like a
    hub checkpoint (model + processor files in one folder)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from diffalign.toy.tokenizer import load_tokenizer, write_tokenizer_files

    tok = load_tokenizer(write_tokenizer_files(folder / "_tokenizer"))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # a non-default value, so a formula that ignored it would fail
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=_image_processor(), tokenizer=tok).save_pretrained(folder)
    return folder, tok


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(len(PROMPTS), 40, 48, 3), dtype=np.uint8)


@torch.no_grad()
def _embed_by_hand(folder, tok, images, prompts):
    """Projected embeddings through the towers directly (not get_*_features), the reference for the formulas."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = _image_processor()(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    tokens = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    txt = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                 attention_mask=tokens["attention_mask"]).pooler_output)
    return model, img, txt


# ------------------------------------------------------------------------------------------------- specs


def test_reward_spec_syntax_and_errors():
    spec = parse_reward_spec("aesthetic=/m/clip-l14:head=/m/sac+logos+ava1-l14-linearMSE.pth")
    assert (spec.name, spec.path, spec.options) == ("aesthetic", "/m/clip-l14", {"head": "/m/sac+logos+ava1-l14-linearMSE.pth"})
    assert parse_reward_spec("hpsv2:version=v2.0").options == {"version": "v2.0"} and parse_reward_spec("hpsv2").path is None
    # A ':' not followed by "word=" stays in the path (Windows drives, hub revisions in folder names).
    assert parse_reward_spec(r"clip=C:\models\clip").path == r"C:\models\clip"
    assert str(parse_reward_spec(" pickscore = /a:processor=/b ")) == "pickscore=/a:processor=/b"
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(UserError, match="has no option 'hed'.*options: head, clip, processor"):
        get_reward("aesthetic=/x:hed=/y")
    with pytest.raises(UserError, match="option 'head' twice"):
        parse_reward_spec("aesthetic=/x:head=/a:head=/b")
    with pytest.raises(UserError, match="has no name"):
        parse_reward_spec("=/x")


def test_images_to_pil_round_trips_uint8_and_tensor(images):
    pils = images_to_pil(images)
    assert [np.asarray(p).tolist() for p in pils] == images.tolist()
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert [np.asarray(p).tolist() for p in images_to_pil(as_tensor)] == images.tolist()


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="reward pickscore: cannot load a CLIP model from"):
        get_reward(f"pickscore={tmp_path / 'missing'}")


# --------------------------------------------------------------------------------------------- CLIP family


def test_pickscore_matches_logit_scale_times_cosine(tiny_clip, images):
    folder, tok = tiny_clip
    reward = get_reward(f"pickscore={folder}", device="cpu", batch_size=2)  # batch 2: several batches and a ragged one
    scores = reward.score(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and torch.isfinite(scores).all()
    model, img, txt = _embed_by_hand(folder, tok, images, PROMPTS)
    expected = model.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert reward.spec == f"pickscore={folder}" and reward.name == "pickscore"
    # Same images as PIL give the same scores (the path evaluate uses).
    torch.testing.assert_close(reward.score(images_to_pil(images), PROMPTS), scores)


def test_clip_score_is_100_times_positive_cosine(tiny_clip, images, tmp_path):
    folder, tok = tiny_clip
    scores = get_reward(f"clip={folder}").score(images, PROMPTS)
    model, img, txt = _embed_by_hand(folder, tok, images, PROMPTS)
    cos = F.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), rtol=1e-4, atol=1e-3)
    # Flip the image projection: the cosines change sign, so exactly one of the two models clamps each image
    # to 0 and the other gives 100*|cos|: this proves the max(., 0), whatever signs random weights give.
    model.visual_projection.weight.data.neg_()
    model.save_pretrained(tmp_path / "flipped")
    from transformers import CLIPProcessor

    CLIPProcessor.from_pretrained(folder).save_pretrained(tmp_path / "flipped")
    flipped = get_reward(f"clip={tmp_path / 'flipped'}").score(images, PROMPTS)
    torch.testing.assert_close(scores + flipped, 100 * cos.abs(), rtol=1e-4, atol=1e-3)
    assert torch.all(torch.minimum(scores, flipped) == 0)


def _save_head(path, input_size, seed=1):
    torch.manual_seed(seed)
    head = AestheticHead(input_size)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def _head_by_hand(state, x):
    for k in (0, 2, 4, 6, 7):  # the released head has no activations: a chain of affine maps
        x = x @ state[f"layers.{k}.weight"].T + state[f"layers.{k}.bias"]
    return x.squeeze(-1)


def test_aesthetic_head_on_normalised_embedding_all_spec_forms(tiny_clip, images, tmp_path):
    folder, tok = tiny_clip
    state = _save_head(tmp_path / "head.pth", 24)
    _, img, _ = _embed_by_hand(folder, tok, images, PROMPTS)
    expected = _head_by_hand(state, F.normalize(img, dim=-1))
    scores = get_reward(f"aesthetic={folder}:head={tmp_path / 'head.pth'}").score(images, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # The head file first, the CLIP model as an option; and a .safetensors head.
    st_state = _save_head(tmp_path / "head.safetensors", 24, seed=2)
    other = get_reward(f"aesthetic={tmp_path / 'head.safetensors'}:clip={folder}").score(images, PROMPTS)
    torch.testing.assert_close(other, _head_by_hand(st_state, F.normalize(img, dim=-1)), rtol=1e-4, atol=1e-5)
    # A folder holding the CLIP model and one head file.
    import shutil

    both = tmp_path / "both"
    shutil.copytree(folder, both)
    shutil.copy(tmp_path / "head.pth", both / "sac+logos+ava1-l14-linearMSE.pth")
    torch.testing.assert_close(get_reward(f"aesthetic={both}").score(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)


def test_aesthetic_errors_name_the_fix(tiny_clip, tmp_path):
    folder, _ = tiny_clip
    with pytest.raises(UserError, match="exactly one head file"):
        get_reward(f"aesthetic={folder}")
    _save_head(tmp_path / "wide.pth", 768)
    with pytest.raises(UserError, match="takes 768-d embeddings but the CLIP model gives 24-d"):
        get_reward(f"aesthetic={folder}:head={tmp_path / 'wide.pth'}")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="improved-aesthetic-predictor MLP layout"):
        get_reward(f"aesthetic={folder}:head={tmp_path / 'bad.pt'}")
    with pytest.raises(UserError, match="head file .* does not exist"):
        get_reward(f"aesthetic={folder}:head={tmp_path / 'none.pth'}")


# ------------------------------------------------------------------------------------- optional packages


def _brightness(image) -> float:
    return float(np.asarray(image, dtype=np.float64).mean())


def _flat_images(values):
    return [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in values]


def test_hpsv2_adapter_groups_by_prompt_and_keeps_order(monkeypatch):
    calls = []

    def score(imgs, prompt, hps_version="v2.0", cp=None):
        calls.append((len(imgs), prompt, hps_version, cp))
        # The package returns a list (of floats or 1-element arrays): use the latter, the harder case.
        return [np.array([_brightness(im) + len(prompt)]) for im in imgs]

    monkeypatch.setitem(sys.modules, "hpsv2", types.SimpleNamespace(score=score))
    values, prompts = [10, 20, 30, 40, 50], ["ab", "c", "ab", "ab", "c"]
    reward = get_reward("hpsv2", batch_size=2)
    scores = reward.score(_flat_images(values), prompts)
    assert scores.tolist() == [v + len(p) for v, p in zip(values, prompts)]
    # "ab" x3 in chunks of 2 then 1, "c" x2 in one call; default version v2.1; no checkpoint unless given.
    assert calls == [(2, "ab", "v2.1", None), (1, "ab", "v2.1", None), (2, "c", "v2.1", None)]
    calls.clear()
    get_reward("hpsv2=/ckpt/HPS_v2_compressed.pt:version=v2.0").score(_flat_images([1]), "x")
    assert calls == [(1, "x", "v2.0", "/ckpt/HPS_v2_compressed.pt")]


def test_imagereward_adapter_float_or_list(monkeypatch):
    loaded = []

    class Model:
        def score(self, prompt, images):
            values = [_brightness(im) * (2 if prompt == "b" else 1) for im in images]
            return values[0] if len(values) == 1 else values  # the package returns a bare float for one image

    def load(name, device="cpu"):
        loaded.append((name, device))
        return Model()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    scores = get_reward("imagereward", device="cpu").score(_flat_images([5, 6, 7]), ["a", "b", "a"])
    assert scores.tolist() == [5.0, 12.0, 7.0]
    assert loaded == [("ImageReward-v1.0", "cpu")]


@pytest.mark.parametrize("spec, module, extra", [("hpsv2", "hpsv2", "hpsv2"), ("imagereward", "ImageReward", "imagereward")])
def test_missing_optional_package_names_the_extra(monkeypatch, spec, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(UserError, match=rf"pip install 'diffalign\[{extra}\]'.*CUDA build of torch"):
        get_reward(spec)


def test_adapter_rejects_wrong_number_of_scores(monkeypatch):
    monkeypatch.setitem(sys.modules, "hpsv2", types.SimpleNamespace(score=lambda imgs, prompt, **kw: [1.0]))
    with pytest.raises(UserError, match="returned 1 scores for 2 images"):
        get_reward("hpsv2").score(_flat_images([1, 2]), "x")
