"""Tests of ``python -m dreamcraft_jax.preprocess`` with tiny ONNX models built here (1x1 convolutions): every
expected value follows in closed form from the drawn image and the model's formula."""

from __future__ import annotations

import sys

import numpy as np
import onnx  # requirements.lock installs onnx (to build the models), onnxruntime and rembg: no skipping here
import pytest
from onnx import TensorProto, helper
from PIL import Image

from dreamcraft_jax.data.reference import depth_beside, load_reference
from dreamcraft_jax.preprocess import ENV_BACKGROUND, ENV_DEPTH, ENV_NORMAL, INSTALL_HINT, cubic_resize_matrix, main

K_BG = 0.5  # background model: foreground probability = sigmoid(K_BG * (x_R - x_B)) on rembg's normalised input
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # rembg's u2net_custom input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH_MAX = 65535


def _conv_model(path, weight, bias, *, sigmoid=False, squeeze=False):
    """Writes an ONNX model y = conv1x1(x; weight (C, 3), bias (C,)) [-> sigmoid] [-> squeeze(axis 1)]."""
    weight = np.asarray(weight, np.float32)
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, (weight.shape[0], 3, 1, 1), weight.ravel().tolist()),
        helper.make_tensor("B", TensorProto.FLOAT, (weight.shape[0],), list(map(float, bias))),
    ]
    nodes = [helper.make_node("Conv", ["image", "W", "B"], ["y0"])]
    last = "y0"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [last], ["y1"]))
        last = "y1"
    if squeeze:  # Omnidata's depth model returns (B, H, W)
        inits.append(helper.make_tensor("axes", TensorProto.INT64, (1,), [1]))
        nodes.append(helper.make_node("Squeeze", [last, "axes"], ["y2"]))
        last = "y2"
    out_shape = [1, "h", "w"] if squeeze else [1, len(bias), "h", "w"]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, out_shape)], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "background": _conv_model(d / "bg.onnx", [[K_BG, 0.0, -K_BG]], [0.0], sigmoid=True),
        # Input (R/255 - 0.5) / 0.5 (Omnidata's depth normalisation) -> 0.5 x + 0.5 = R / 255: depth = red.
        "depth": _conv_model(d / "depth.onnx", [[0.5, 0.0, 0.0]], [0.5], squeeze=True),
        "normal": _conv_model(d / "normal.onnx", np.eye(3), [0.0, 0.0, 0.0]),  # normal = the input RGB / 255
    }


@pytest.fixture(autouse=True)
def _no_model_env(monkeypatch):
    for name in (ENV_BACKGROUND, ENV_DEPTH, ENV_NORMAL):
        monkeypatch.delenv(name, raising=False)


def _ramp_rgba(h, w, r0, r1, c0, c1):
    """(h, w, 4) uint8: red = 4 * column over the whole image (also under the transparent pixels, which the
    estimators see), an opaque rectangle rows [r0, r1) cols [c0, c1), the rest transparent."""
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0] = 4 * np.arange(w)[None, :]
    img[..., 1] = 90
    img[r0:r1, c0:c1, 3] = 255
    return img


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def _read(path):
    return np.asarray(Image.open(path))


def _bbox(mask):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_bicubic_is_pytorchs():
    """[0, 1] upsampled to 4 samples at s = -0.25, 0.25, 0.75, 1.25 (align_corners=False), edge taps clamped, with
    Keys' kernel at a = -0.75 worked by hand: w(0.25) = 0.87890625, w(0.75) = 0.26171875, w(1.25) = -0.10546875,
    w(1.75) = -0.03515625; e.g. s = -0.25 reads only the last tap with weight w(1.25)."""
    out = cubic_resize_matrix(2, 4) @ np.array([0.0, 1.0])
    np.testing.assert_allclose(out, [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-12)


@pytest.mark.parametrize("output", ["depth", "disparity"])
def test_depth_of_a_ramp_no_recenter(tmp_path, models, output):
    """Depth = red = 4 * column (affine; the 64 -> 128 -> 64 bilinear / bicubic round trip keeps affine maps
    exactly away from the image border), min-max inside the mask: (c - c0) / (c1 - c0); disparity reverses it."""
    photo = _save(tmp_path / "ramp.png", _ramp_rgba(48, 64, 10, 30, 12, 52))
    rc = main([photo, "--depth_model", models["depth"], "--depth_output", output, "--no-recenter",
               "--depth_input_size", "128"])
    assert rc == 0
    depth = _read(tmp_path / "ramp_depth.png")
    assert depth.dtype == np.uint16 and depth.shape == (48, 64)
    unit = np.broadcast_to((np.arange(64) - 12) / (51 - 12), (48, 64))
    expected = np.zeros((48, 64))
    expected[10:30, 12:52] = (unit if output == "depth" else 1 - unit)[10:30, 12:52] * DEPTH_MAX
    np.testing.assert_allclose(depth, expected, atol=1.0)
    rgba = _read(tmp_path / "ramp_rgba.png")
    np.testing.assert_array_equal(rgba, _ramp_rgba(48, 64, 10, 30, 12, 52))  # the input's own alpha, as is
    assert not (tmp_path / "ramp_normal.png").exists()


@pytest.mark.parametrize("output", ["depth", "disparity"])
def test_recentred_outputs_and_round_trip(tmp_path, models, output, capsys):
    """--size 64: the object's longer bbox side is int(64 * 0.9) = 57 (+-1), centred; depth is 0 outside the written
    alpha, spans [0, 65535] inside, grows with the column (depth) or shrinks (disparity); the loader reads it."""
    src = _ramp_rgba(96, 64, 10, 41, 20, 36)  # 31 x 16 object, off-centre, non-square canvas
    photo = _save(tmp_path / "obj.png", src)
    assert main([photo, "--depth_model", models["depth"], "--depth_output", output, "--size", "64"]) == 0
    assert "no normal model" in capsys.readouterr().out
    rgba = _read(tmp_path / "obj_rgba.png")
    depth = _read(tmp_path / "obj_depth.png")
    assert rgba.shape == (64, 64, 4) and depth.shape == (64, 64) and depth.dtype == np.uint16
    fg = rgba[..., 3] > 0
    r0, r1, c0, c1 = _bbox(fg)
    assert abs((r1 - r0) - int(64 * 0.9)) <= 1
    assert abs((c1 - c0) - int(64 * 0.9) * 16 / 31) <= 2  # aspect kept
    assert abs((r0 + r1) / 2 - 32) <= 1 and abs((c0 + c1) / 2 - 32) <= 1
    assert np.all(depth[~fg] == 0)
    assert depth[fg].min() == 0 and depth[fg].max() == DEPTH_MAX
    rows = slice(r0 + 3, r1 - 3)  # columns' mean depth over the object's inner rows
    col_means = depth[rows, c0 + 2 : c1 - 2].astype(np.float64).mean(axis=0)
    steps = np.diff(col_means)
    assert np.all(steps > 0) if output == "depth" else np.all(steps < 0)

    # Round trip: the loader finds the depth beside the RGBA and reads what was written.
    rgba_path = tmp_path / "obj_rgba.png"
    assert depth_beside(rgba_path) == tmp_path / "obj_depth.png"
    ref = load_reference(rgba_path, 64, 64, depth_path=depth_beside(rgba_path))
    np.testing.assert_allclose(ref.mask, rgba[..., 3] / 255, atol=1e-5)
    inner = ref.mask > 0.5  # the loader's mask; it re-normalises the file's depth over it
    d = depth.astype(np.float64)
    expected = np.where(inner, (d - d[inner].min()) / (d[inner].max() - d[inner].min()), 0.0)
    np.testing.assert_allclose(ref.depth, expected, atol=1e-4)
    # Written once here == framed at load time by the loader from the original (up to 8-bit rounding).
    direct = load_reference(photo, 64, 64, recenter=True)
    np.testing.assert_allclose(ref.mask, direct.mask, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(ref.rgb, direct.rgb, atol=0.5 / 255 + 1e-6)


def test_normal_map_official_channel_order(tmp_path, models):
    """Identity normal model on a uniform (200, 100, 50) image: the file holds the channels reversed (cv2's
    imwrite of an RGB array) inside the mask and 0 outside."""
    img = np.zeros((40, 48, 4), np.uint8)
    img[..., :3] = (200, 100, 50)
    img[8:30, 10:40, 3] = 255
    img[8:30, 10, 3] = 128  # a soft edge is inside the mask too (alpha > 0)
    photo = _save(tmp_path / "n.png", img)
    assert main([photo, "--normal_model", models["normal"], "--no-recenter"]) == 0
    normal = _read(tmp_path / "n_normal.png")
    expected = np.zeros((40, 48, 3), np.uint8)
    expected[img[..., 3] > 0] = (50, 100, 200)
    np.testing.assert_array_equal(normal, expected)
    assert not (tmp_path / "n_depth.png").exists()


def test_background_removed_with_rembg(tmp_path, models):
    """A photo without alpha: red square and purple strip on blue. At 320 x 320 rembg's resizes to and from its
    320 x 320 input are identities, so the matte is min-max(sigmoid(K (x_R - x_B))) * 255, truncated, with
    x = (v / 255 - mean) / std (ImageNet statistics; the photo's maximum is 255)."""
    photo = np.zeros((320, 320, 3), np.uint8)
    photo[...] = (0, 0, 255)
    photo[100:220, 60:180] = (255, 0, 0)
    photo[100:220, 180:240] = (128, 0, 128)
    path = _save(tmp_path / "p.png", photo)
    assert main([path, "--background_model", models["background"], "--no-recenter"]) == 0
    rgba = _read(tmp_path / "p_rgba.png")
    x = photo / 255.0
    xr, xb = (x[..., 0] - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (x[..., 2] - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
    prob = 1 / (1 + np.exp(-K_BG * (xr - xb)))
    expected = np.floor((prob - prob.min()) / (prob.max() - prob.min()) * 255)
    assert 60 < expected[150, 200] < 200  # the strip is a soft part of the matte
    np.testing.assert_allclose(rgba[..., 3], expected, atol=1)
    np.testing.assert_array_equal(rgba[..., :3], photo)  # straight colour, the photo's own
    assert not (tmp_path / "p_depth.png").exists()


def test_rgba_input_needs_no_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rembg", None)  # any attempt to import rembg would fail
    photo = _save(tmp_path / "cut.png", _ramp_rgba(40, 40, 5, 30, 8, 20))
    assert main([photo, "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "no depth model" in out and ENV_DEPTH in out
    assert _read(tmp_path / "cut_rgba.png").shape == (32, 32, 4)
    assert not (tmp_path / "cut_depth.png").exists() and not (tmp_path / "cut_normal.png").exists()


@pytest.mark.parametrize("case", ["no_background_model", "missing_depth_flag", "missing_background_env"])
def test_missing_model_is_one_clear_error(tmp_path, monkeypatch, capsys, case):
    rgb = _save(tmp_path / "rgb.png", np.full((32, 32, 3), 128, np.uint8))
    rgba = _save(tmp_path / "rgba.png", _ramp_rgba(32, 32, 4, 20, 4, 20))
    missing = str(tmp_path / "nowhere" / "model.onnx")
    if case == "no_background_model":
        argv, words = [rgb], ["--background_model", ENV_BACKGROUND, "rgb.png", "transparen"]
    elif case == "missing_depth_flag":
        argv, words = [rgba, "--depth_model", missing], [missing, "--depth_model", ENV_DEPTH]
    else:
        monkeypatch.setenv(ENV_BACKGROUND, missing)
        argv, words = [rgb], [missing, "--background_model", ENV_BACKGROUND]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.png", "rgba.png"]  # nothing written


@pytest.mark.parametrize("module", ["onnxruntime", "rembg"])
def test_missing_package_says_what_to_install(tmp_path, models, monkeypatch, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)
    if module == "rembg":
        argv = [_save(tmp_path / "rgb.png", np.full((32, 32, 3), 128, np.uint8)),
                "--background_model", models["background"]]
    else:
        argv = [_save(tmp_path / "rgba.png", _ramp_rgba(32, 32, 4, 20, 4, 20)), "--depth_model", models["depth"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and module in err and err.count("\n") == 1


def test_refuses_to_overwrite(tmp_path, models, capsys):
    photo = _save(tmp_path / "o.png", _ramp_rgba(32, 32, 4, 20, 4, 20))
    assert main([photo, "--depth_model", models["depth"], "--size", "32"]) == 0
    written = {p: p.read_bytes() for p in (tmp_path / "o_rgba.png", tmp_path / "o_depth.png")}
    capsys.readouterr()
    assert main([photo, "--size", "48"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "o_rgba.png" in err and err.count("\n") == 1
    assert all(p.read_bytes() == data for p, data in written.items())  # nothing lost
    # With --overwrite and no depth model the old depth map (framed for the old RGBA) goes too.
    assert main([photo, "--size", "48", "--overwrite"]) == 0
    assert _read(tmp_path / "o_rgba.png").shape == (48, 48, 4)
    assert not (tmp_path / "o_depth.png").exists()


def test_folder_input_skips_outputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c_rgba.png", "c_depth.png"):
        _save(src / name, _ramp_rgba(24, 24, 4, 20, 6, 18))
    assert main([str(src), "--size", "16", "--out_dir", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_rgba.png", "b_rgba.png"]
