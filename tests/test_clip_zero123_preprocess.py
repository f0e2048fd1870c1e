"""Zero123's CLIP preprocessing (the official FrozenCLIPImageEmbedder path) vs torch / kornia.

References come from tests/fixtures/make_resize_fixtures.py (torch ``F.interpolate(mode="bicubic",
align_corners=True)`` and the kornia preprocessing, run once); these tests only need numpy / jax.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.models import clip

FIXTURE = Path(__file__).parent / "fixtures" / "resize_bicubic_align_corners.npz"
RESIZE_CASES = ("down256_h", "down256_w", "up37", "small", "mixed", "size1", "identity")
TOL = 1e-5  # measured: 4e-7 (resize), 1.2e-6 (preprocessing, values up to 2.6)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("case", RESIZE_CASES)
def test_resize_matches_torch_bicubic_align_corners(ref, case):
    x, expected = ref[f"{case}_in"], ref[f"{case}_out"]
    out = clip.bicubic_resize_align_corners(jnp.asarray(x), *expected.shape[1:3])
    assert out.shape == expected.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, atol=TOL, rtol=0)


def test_zero123_preprocess_matches_the_official_kornia_path(ref):
    """2x - 1, kornia resize (1, 64, 48) -> 224 x 224 (non-square: stretched, no crop), (x + 1) / 2, CLIP mean/std."""
    s = int(ref["zero123_stride"])
    out = jax.jit(clip.zero123_clip_preprocess)(jnp.asarray(ref["zero123_in"]))
    assert out.shape == (1, 224, 224, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[:, ::s, ::s], ref["zero123_out"], atol=TOL, rtol=0)
    # Not the CLIPImageProcessor-like path (shortest side + centre crop, Keys a = -0.5, antialias).
    other = np.asarray(clip.clip_preprocess(jnp.asarray(ref["zero123_in"])))[:, ::s, ::s]
    assert np.abs(other - ref["zero123_out"]).max() > 0.1


@pytest.mark.parametrize("n_in,n_out", [(40, 224), (256, 224), (9, 5), (7, 13)])
def test_resize_of_a_ramp_closed_form(n_in, n_out):
    """Cubic convolution with a = -0.75 keeps constants but bends a ramp f(k) = k: at source position s = j + t the
    output is s + 0.5 t (1 - t) (1 - 2t) in the interior (exact only at t in {0, 1/2, 1}; a = -0.5 would keep it).
    Border clamping adds the clamped tap's weight times the value error: + a t (1 - t)^2 when j = 0 (tap -1 reads
    f(0) = f(-1) + 1) and - a (1 - t) t^2 when j = n_in - 2 (tap n_in reads f(n_in - 1) = f(n_in) - 1). Corners map
    exactly onto corners."""
    a = clip.BICUBIC_A
    s = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    j = np.minimum(np.floor(s), n_in - 1)
    t = s - j
    expected = s + 0.5 * t * (1 - t) * (1 - 2 * t)
    expected += np.where(j == 0, a * t * (1 - t) ** 2, 0.0)
    expected -= np.where(j == n_in - 2, a * (1 - t) * t ** 2, 0.0)
    ramp = np.arange(n_in, dtype=np.float32) / (n_in - 1)  # scaled to [0, 1]: float32 errors ~1e-7
    img = np.broadcast_to(ramp[None, :, None, None], (1, n_in, 3, 2))
    out = np.asarray(clip.bicubic_resize_align_corners(jnp.asarray(img), n_out, 3))
    np.testing.assert_allclose(out[0, :, 1, 0], expected / (n_in - 1), atol=1e-6, rtol=0)
    assert out[0, 0, 1, 0] == 0.0 and abs(out[0, -1, 1, 0] - 1.0) < 1e-6
    assert np.abs(out - out[:, :, :1, :1]).max() == 0.0  # constant along the other axis stays exact
    # The same along the width.
    out_w = np.asarray(clip.bicubic_resize_align_corners(jnp.asarray(img.transpose(0, 2, 1, 3)), 3, n_out))
    np.testing.assert_allclose(out_w[0, 1, :, 0], expected / (n_in - 1), atol=1e-6, rtol=0)
    # Constants: every row of the matrix sums to 1, clamped taps included.
    assert np.abs(clip.bicubic_align_corners_matrix(n_in, n_out).sum(1) - 1).max() < 1e-6


def test_resize_interpolates_and_is_differentiable():
    rng = np.random.default_rng(1)
    x = rng.random((2, 9, 7, 3), dtype=np.float32)
    # Source positions on the input grid (align corners, (9 - 1) / (5 - 1) = 2): the samples themselves.
    np.testing.assert_array_equal(np.asarray(clip.bicubic_resize_align_corners(jnp.asarray(x), 5, 7)), x[:, ::2])
    # Linear: the gradient of <resize(x), g> is M_h^T g M_w.
    g = rng.random((2, 4, 11, 3), dtype=np.float32)
    grad = jax.grad(lambda v: jnp.sum(clip.bicubic_resize_align_corners(v, 4, 11) * g))(jnp.asarray(x))
    m_h, m_w = clip.bicubic_align_corners_matrix(9, 4), clip.bicubic_align_corners_matrix(7, 11)
    np.testing.assert_allclose(np.asarray(grad), np.einsum("oh,bopc,pw->bhwc", m_h, g, m_w), atol=1e-5)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        clip.bicubic_align_corners_matrix(0, 3)


def test_zero123_prior_embeds_the_reference_through_the_official_preprocessing(demo_prior_root):
    """load_zero123_prior's reference embedding = image_embeds(zero123_clip_preprocess(reference))."""
    from conftest import tiny_config
    from dreamcraft_jax.guidance import priors as priors_mod

    cfg = tiny_config(**{"loss.lambda_3d_sd": 0.1, "guidance.zero123.resolution": 32})
    _, cfg.guidance.zero123.pretrained = priors_mod.demo_prior_paths(demo_prior_root)
    ref_rgb = np.random.default_rng(2).random((48, 48, 3), dtype=np.float32)  # 48 -> the encoder's 32 px
    _, params = priors_mod.load_zero123_prior(cfg.guidance.zero123, ref_rgb, (0.0, 0.0, 1.2))
    vision, vision_params = clip.load_clip_vision(cfg.guidance.zero123.pretrained)
    size = vision.config.image_size
    embed = vision.apply({"params": vision_params},
                         clip.zero123_clip_preprocess(jnp.asarray(ref_rgb)[None], size)).image_embeds
    np.testing.assert_allclose(np.asarray(params["embedding"]), np.asarray(embed), atol=1e-5, rtol=1e-5)
