"""CLIP text / vision towers, Zero123 camera projection, preprocessing and tokenizer vs transformers (torch).

Reference outputs come from tests/fixtures/make_clip_fixtures.py (tiny random transformers models, run once with
torch); these tests only need numpy / jax. Relative error = max |jax - torch| / max |torch|.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.models import clip
from dreamcraft_jax.models.loading import WeightLoadingError

FIXTURES = Path(__file__).parent / "fixtures"
FP32_TOL = 1e-4
BF16_TOL = 2e-2


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, np.float32)
    return float(np.abs(np.asarray(actual, np.float32) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "clip_outputs.npz"))


@pytest.fixture(scope="module")
def text_models():
    return {name: clip.load_clip_text(FIXTURES / f"clip_text_{name}") for name in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def vision_model():
    return clip.load_clip_vision(FIXTURES / "clip_vision")


# ---------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_text_parity(text_models, ref, name):
    module, params = text_models[name]
    ids = ref[f"{name}_input_ids"]
    out = module.apply({"params": params}, ids)
    assert out.last_hidden_state.shape == ref[f"{name}_last_hidden"].shape
    assert out.last_hidden_state.dtype == jnp.float32
    assert rel_err(out.last_hidden_state, ref[f"{name}_last_hidden"]) <= FP32_TOL
    assert rel_err(out.pooler_output, ref[f"{name}_pooled"]) <= FP32_TOL
    skip = jax.jit(lambda p, x, k: module.apply({"params": p}, x, clip_skip=k), static_argnums=2)
    for k in (1, 2):
        out_k = skip(params, ids, k)
        assert rel_err(out_k.last_hidden_state, ref[f"{name}_clip_skip{k}"]) <= FP32_TOL
        # The pooled output stays the last layer's, as in transformers.
        assert rel_err(out_k.pooler_output, ref[f"{name}_pooled"]) <= FP32_TOL
    np.testing.assert_allclose(skip(params, ids, 0).last_hidden_state, out.last_hidden_state, atol=1e-5)


def test_text_pooling_branches(text_models, ref):
    # SD1 fixture: legacy eos_token_id 2 -> argmax(input_ids) (the first EOS, the largest id).
    module, params = text_models["sd1"]
    assert module.config.eos_token_id == 2
    ids = ref["sd1_input_ids"]
    out = module.apply({"params": params}, ids)
    pos = ids.argmax(-1)
    np.testing.assert_allclose(out.pooler_output, np.asarray(out.last_hidden_state)[np.arange(len(ids)), pos])
    # SD2 fixture: eos_token_id 500 -> first EOS, although larger ids come earlier in the prompt.
    module, params = text_models["sd2"]
    ids = ref["sd2_input_ids"]
    out = module.apply({"params": params}, ids)
    first_eos = (ids == module.config.eos_token_id).argmax(-1)
    assert (first_eos != ids.argmax(-1)).all()
    np.testing.assert_allclose(out.pooler_output, np.asarray(out.last_hidden_state)[np.arange(len(ids)), first_eos])


def test_text_configs_and_checks(text_models):
    sd1, params = text_models["sd1"]
    assert sd1.config.hidden_act == "quick_gelu" and sd1.config.num_hidden_layers == 3
    assert text_models["sd2"][0].config.hidden_act == "gelu"
    assert set(params) == {"text_model"}
    assert set(params["text_model"]["encoder"]) == {"layers_0", "layers_1", "layers_2"}
    # Random init gives the same tree as the loaded one.
    fresh = sd1.init_params(jax.random.key(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    ids = np.zeros((1, 5), np.int32)
    # clip_skip == num_layers: the embeddings through final_layer_norm.
    emb = sd1.apply({"params": params}, ids, clip_skip=3).last_hidden_state
    assert emb.shape == (1, 5, 32) and np.isfinite(emb).all()
    with pytest.raises(ValueError, match="clip_skip"):
        sd1.apply({"params": params}, ids, clip_skip=4)
    with pytest.raises(ValueError, match="input_ids"):
        sd1.apply({"params": params}, np.zeros((1, 78), np.int32))


# ---------------------------------------------------------------------------------------------- vision


def test_vision_parity(vision_model, ref):
    module, params = vision_model
    out = module.apply({"params": params}, ref["vision_pixels"])
    assert out.image_embeds.shape == (2, 16)
    assert out.last_hidden_state.shape == (2, 1 + 16, 32)
    assert rel_err(out.image_embeds, ref["vision_image_embeds"]) <= FP32_TOL
    with pytest.raises(ValueError, match="NHWC"):
        module.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32))


def test_bf16_compute(text_models, vision_model, ref):
    module, params = text_models["sd1"]
    bf16 = clip.CLIPTextModel(module.config, jnp.bfloat16)
    out = bf16.apply({"params": params}, ref["sd1_input_ids"])
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert rel_err(out.last_hidden_state, ref["sd1_last_hidden"]) <= BF16_TOL
    assert rel_err(out.pooler_output, ref["sd1_pooled"]) <= BF16_TOL
    module, params = vision_model
    out = clip.CLIPVisionModelWithProjection(module.config, jnp.bfloat16).apply({"params": params},
                                                                                ref["vision_pixels"])
    assert out.image_embeds.dtype == jnp.bfloat16
    assert rel_err(out.image_embeds, ref["vision_image_embeds"]) <= BF16_TOL


def test_load_with_mesh():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    _, params = clip.load_clip_vision(FIXTURES / "clip_vision", mesh=mesh)
    leaf = params["visual_projection"]["kernel"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(jax.devices())


# ---------------------------------------------------------------------------------------------- preprocessing


def _numpy_normalise(x):
    return (x - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)


def test_clip_preprocess_normalisation_and_crop():
    rng = np.random.default_rng(0)
    square = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    out = np.asarray(clip.clip_preprocess(jnp.asarray(square), size=32))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, _numpy_normalise(square), atol=1e-5)
    # Shortest side already at `size`: no resize, a center crop of the long side.
    tall = rng.uniform(size=(1, 48, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(clip.clip_preprocess(jnp.asarray(tall), size=32)),
                               _numpy_normalise(tall[:, 8:40]), atol=1e-5)
    assert clip.clip_preprocess(jnp.zeros((3, 256, 320, 3)), size=224).shape == (3, 224, 224, 3)


def test_clip_preprocess_close_to_pil():
    from PIL import Image

    yy, xx = np.meshgrid(np.linspace(0, 1, 256), np.linspace(0, 1, 320), indexing="ij")
    u8 = (np.stack([0.5 + 0.4 * np.sin(6 * xx), 0.5 + 0.4 * np.cos(5 * yy), xx * yy], -1) * 255).round()
    u8 = u8.astype(np.uint8)
    # CLIPImageProcessor geometry: shortest side 256 -> 224 (long 320 -> 280), center crop 224.
    pil = np.asarray(Image.fromarray(u8).resize((280, 224), Image.BICUBIC), np.float32)[:, 28:252] / 255
    out = np.asarray(clip.clip_preprocess(jnp.asarray(u8[None] / 255.0, jnp.float32)))[0]
    err = np.abs(out * np.array(clip.CLIP_STD) + np.array(clip.CLIP_MEAN) - pil)
    assert err.max() < 2.5 / 255 and err.mean() < 0.5 / 255


# ---------------------------------------------------------------------------------------------- camera projection


@pytest.mark.parametrize("pipe,sub", [("clip_camproj_pipe", "clip_camera_projection"),
                                      ("clip_ccproj_pipe", "cc_projection")])
def test_camera_projection_layouts(ref, pipe, sub):
    for path in (FIXTURES / pipe, FIXTURES / pipe / sub):  # pipeline folder or the component folder
        module, params = clip.load_camera_projection(path)
        assert (module.in_features, module.out_features) == (12, 8)
        assert set(params) == {"proj"} and set(params["proj"]) == {"kernel", "bias"}
        out = module.apply({"params": params}, ref["camproj_input"])
        assert rel_err(out, ref[f"{sub}_output"]) <= FP32_TOL


def test_camera_projection_configs(tmp_path, ref):
    folder = tmp_path / "cc_projection"
    shutil.copytree(FIXTURES / "clip_ccproj_pipe" / "cc_projection", folder)
    # The layout dreamcraft_jax.models.convert_ldm writes (plural key names).
    (folder / "config.json").write_text(json.dumps({"in_channels": 12, "out_channels": 8}))
    module, params = clip.load_camera_projection(tmp_path)
    assert rel_err(module.apply({"params": params}, ref["camproj_input"]), ref["cc_projection_output"]) <= FP32_TOL
    (folder / "config.json").write_text(json.dumps({"in_channel": 14, "out_channel": 8}))
    with pytest.raises(WeightLoadingError, match="proj.weight"):
        clip.load_camera_projection(tmp_path)
    with pytest.raises(WeightLoadingError, match="no Zero123 camera projection"):
        clip.load_camera_projection(FIXTURES / "clip_tokenizer")
    with pytest.raises(WeightLoadingError, match="does not exist"):
        clip.load_camera_projection(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- loading errors


def _copy(name: str, tmp_path: Path, **config_overrides) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_overrides)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_loading_errors(tmp_path):
    with pytest.raises(WeightLoadingError, match="does not exist"):
        clip.load_clip_text(tmp_path / "missing")
    with pytest.raises(WeightLoadingError, match="text_encoder/config.json"):
        clip.load_clip_text(FIXTURES / "clip_tokenizer")
    with pytest.raises(WeightLoadingError, match=r"text_model\.embeddings\.position_embedding\.weight"):
        clip.load_clip_text(_copy("clip_text_sd1", tmp_path, max_position_embeddings=64))
    with pytest.raises(WeightLoadingError, match=r"unexpected in checkpoint.*text_model\.encoder\.layers\.1\."):
        clip.load_clip_text(_copy("clip_text_sd2", tmp_path, num_hidden_layers=1))
    with pytest.raises(WeightLoadingError, match=r"visual_projection\.weight"):
        clip.load_clip_vision(_copy("clip_vision", tmp_path, projection_dim=8))
    with pytest.raises(WeightLoadingError, match="fp16"):
        clip.load_clip_vision(FIXTURES / "clip_vision", variant="fp16")
    with pytest.raises(WeightLoadingError, match="hidden_act"):
        clip.load_clip_text(_copy("clip_text_sd1", tmp_path / "act", hidden_act="swish"))


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenize(ref):
    tok = clip.load_tokenizer(FIXTURES / "clip_tokenizer")
    vocab = json.loads((FIXTURES / "clip_tokenizer" / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = clip.tokenize(tok, list(ref["sd1_prompts"]))
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    np.testing.assert_array_equal(ids, ref["sd1_input_ids"])  # what transformers gave in the fixture script
    one = clip.tokenize(tok, "A  cat")  # lower-cased, whitespace collapsed; pad = EOS as in SD1
    np.testing.assert_array_equal(one[0, :4], [bos, vocab["a</w>"], vocab["cat</w>"], eos])
    assert (one[0, 4:] == tok.pad_token_id).all()
    long = clip.tokenize(tok, " ".join(["zebra"] * 100), max_length=10)
    np.testing.assert_array_equal(long[0], [bos] + [vocab["zebra</w>"]] * 8 + [eos])  # truncation keeps the EOS


def test_tokenizer_errors(tmp_path):
    with pytest.raises(WeightLoadingError, match="vocab.json"):
        clip.load_tokenizer(FIXTURES / "clip_vision")
    with pytest.raises(WeightLoadingError, match="does not exist"):
        clip.load_tokenizer(tmp_path / "missing")
    # A pipeline folder with tokenizer/ inside.
    shutil.copytree(FIXTURES / "clip_tokenizer", tmp_path / "pipe" / "tokenizer")
    assert clip.load_tokenizer(tmp_path / "pipe").pad_token_id == json.loads(
        (FIXTURES / "clip_tokenizer" / "vocab.json").read_text())["<|endoftext|>"]
