"""Turns a photo into the reference files training reads: ``python -m dreamcraft_jax.preprocess photo.png``.

The official ``preprocess_image.py`` of DreamCraft3D, with local ONNX models run by onnxruntime (nothing is ever
downloaded; ``pip install "dreamcraft-jax[preprocess]"`` adds rembg and onnxruntime):

1. Background: an input with transparency (some alpha < 255) is used as it is; otherwise the background is removed
   with a rembg-compatible U^2-Net-style ONNX file (``--background_model`` / ``$DREAMCRAFT_REMBG_MODEL``, e.g. rembg's
   ``u2net.onnx``) through ``rembg.new_session("u2net_custom", model_path=...)``. The matte becomes the alpha; the
   colour stays the photo's (straight, not premultiplied). The object is ``mask = alpha > 0`` (official).
2. Depth and normal are estimated on the whole, uncropped photo RGB as stored (for an RGBA input its RGB channels,
   not composited onto any background), as the official code feeds its ``image``: resized to
   ``--depth_input_size``^2 with pillow's bilinear filter (what torchvision's ``Resize`` does to a PIL image), x in
   [0, 1] normalised (x - mean) / std (Omnidata: depth mean 0.5, std 0.5; normal none), NCHW float32. The output
   is clamped to [0, 1] (Omnidata's convention; not for ``--depth_output disparity``, whose values are relative
   and unbounded) and resized back to the photo's size with PyTorch's bicubic (a = -0.75, align_corners=False),
   as the official ``F.interpolate``.
3. Depth is min-max normalised inside the mask, 0 outside, *larger = farther* (Omnidata outputs depth; a
   MiDaS / DPT / Depth-Anything model outputs disparity: ``--depth_output disparity`` reverses the order inside the
   mask, d -> 1 - d). No depth model: no depth file (depth is optional for training).
4. Re-centring (on by default; ``--no-recenter`` keeps the photo's framing and size): the bbox of the mask is
   placed on a ``--size`` square so that its longer side is ``int(size * (1 - border_ratio))`` (90 %), centred,
   with :func:`dreamcraft_jax.data.reference.frame_cutout`, the formula the training loader uses.

Files, for an input ``<name>.<ext>``, beside it (or in ``--out_dir``); the names the loader looks for
(``depth_beside``, ``data.depth = "auto"``):

* ``<name>_rgba.png``: 8-bit RGBA, straight colour, alpha = the matte.
* ``<name>_depth.png``: **16-bit** grayscale (the official file is 8-bit; the loader reads both), larger =
  farther, spanning exactly [0, 65535] over ``alpha > 0`` of the written RGBA (0 = nearest), 0 outside.
* ``<name>_normal.png`` (only with a normal model): 8-bit, model output in [0, 1] * 255, 0 outside the mask, in
  the official on-disk layout: ``cv2.imwrite`` of an RGB array stores the channels reversed, so the file's R, G, B
  hold the model's channels 2, 1, 0. ``cv2.imread`` returns the model's order, as the official loader expects;
  with pillow, read it and reverse the last axis. (Stage 1 never reads it.)

Existing outputs are never replaced without ``--overwrite`` (then stale depth / normal files that this run does not
rewrite are removed, since they would not match the new RGBA). Every problem ends with one ``error:`` line and
exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dreamcraft_jax.data.reference import MIN_SIZE, ReferenceImageError, frame_cutout

__all__ = ["PreprocessError", "cubic_resize_matrix", "main", "outputs_for", "read_photo"]

INSTALL_HINT = 'pip install "dreamcraft-jax[preprocess]"'
ENV_BACKGROUND = "DREAMCRAFT_REMBG_MODEL"
ENV_DEPTH = "DREAMCRAFT_DEPTH_MODEL"
ENV_NORMAL = "DREAMCRAFT_NORMAL_MODEL"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OUTPUT_KINDS = ("rgba", "depth", "normal")
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (Keys' kernel); pillow's BICUBIC uses -0.5
_DEPTH_MAX = 65535  # 16-bit depth file


class PreprocessError(RuntimeError):
    """A problem with the inputs, models or outputs; main() prints its message as one line."""


@dataclass(frozen=True)
class _Model:
    """Where a model comes from: the file (None if not given), its flag and environment variable."""

    path: Path | None
    flag: str
    env: str
    what: str

    def check(self) -> None:
        if self.path is not None and not self.path.is_file():
            raise PreprocessError(
                f"{self.what} not found: {self.path} (given by {self.flag} or ${self.env}; pass an existing "
                "ONNX file)"
            )


def outputs_for(image: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """{"rgba", "depth", "normal"} -> ``<out_dir>/<name>_<kind>.png`` for an input ``<name>.<ext>``."""
    image = Path(image)
    folder = Path(out_dir) if out_dir is not None else image.parent
    return {kind: folder / f"{image.stem}_{kind}.png" for kind in OUTPUT_KINDS}


def read_photo(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """rgb (h, w, 3) uint8 as stored, and alpha (h, w) uint8 or None when the image has no transparency (no alpha
    channel, or one that is 255 everywhere). EXIF orientation is applied, as rembg and the loader do."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im.load()
    except Exception as exc:  # pillow raises many types; the user needs the reason only
        raise PreprocessError(f"could not read image {p}: {type(exc).__name__}: {exc}") from None
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise PreprocessError(f"{p} is a 16-bit / float grayscale image; save it as an 8-bit PNG or JPG")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    rgba = np.asarray(im.convert("RGBA"))
    alpha = rgba[..., 3]
    return np.ascontiguousarray(rgba[..., :3]), (alpha.copy() if has_alpha and alpha.min() < 255 else None)


def cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of PyTorch's ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis.

    Output i samples the input at s = (i + 0.5) * n_in / n_out - 0.5 with Keys' cubic kernel (a = -0.75)
    w(x) = (a + 2)|x|^3 - (a + 3)|x|^2 + 1 for |x| <= 1, a|x|^3 - 5a|x|^2 + 8a|x| - 4a for 1 < |x| < 2, on the
    taps floor(s) - 1 .. floor(s) + 2 clamped to [0, n_in - 1]; no antialiasing when shrinking (as PyTorch).
    """
    a = _CUBIC_A
    s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(s)
    frac = s - base
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for k in (-1, 0, 1, 2):
        x = np.abs(frac - k)
        w = np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
        np.add.at(weights, (rows, np.clip(base + k, 0, n_in - 1).astype(np.int64)), w)
    return weights


# ------------------------------------------------------------------------------- optional packages


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Sets environment variables for the duration of the block, then restores them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise PreprocessError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def _import_rembg():
    # rembg imports pymatting, whose numba functions (alpha matting only, never used here) compile at import:
    # about a minute in a fresh environment. With the JIT off while importing they stay plain Python; numba
    # re-reads the variable before any later compilation, so other numba users in the process are unaffected.
    no_jit = "numba" not in sys.modules and "NUMBA_DISABLE_JIT" not in os.environ
    try:
        with _environ(NUMBA_DISABLE_JIT="1") if no_jit else contextlib.nullcontext():
            import rembg
    except ImportError:
        raise PreprocessError(f"rembg is not installed: {INSTALL_HINT}") from None
    return rembg


# ------------------------------------------------------------------------------------------ models


class _OnnxEstimator:
    """A dense-prediction ONNX model: one NCHW float32 input, first output (1, C, h, w), (1, h, w) or (h, w)."""

    def __init__(self, model: _Model):
        ort = _import_onnxruntime()
        self.model = model
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        try:
            self.session = ort.InferenceSession(str(model.path), sess_options=options, providers=providers)
        except Exception as exc:
            raise PreprocessError(f"could not load {model.what} {model.path} ({model.flag}): {exc}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
                 clamp: bool) -> np.ndarray:
        """rgb (H, W, 3) uint8 -> (C, H, W) float32 at the photo's size (see the module docstring)."""
        h, w = rgb.shape[:2]
        x = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        try:
            y = np.asarray(self.session.run(None, {self.input_name: x})[0], np.float32)
        except Exception as exc:
            raise PreprocessError(
                f"{self.model.what} {self.model.path} failed on a 1x3x{size}x{size} input: {exc}"
            ) from None
        if y.ndim == 4 and y.shape[0] == 1:
            y = y[0]
        elif y.ndim == 2:
            y = y[None]
        if y.ndim != 3:
            raise PreprocessError(
                f"{self.model.what} {self.model.path} gave an output of shape {y.shape}; expected (1, C, h, w), "
                "(1, h, w) or (h, w)"
            )
        if clamp:
            y = np.clip(y, 0.0, 1.0)
        rows, cols = cubic_resize_matrix(y.shape[1], h), cubic_resize_matrix(y.shape[2], w)
        return (rows @ y.astype(np.float64) @ cols.T).astype(np.float32)  # (H, h) @ (C, h, w) @ (w, W)


class _Preprocessor:
    """Models, loaded on first use and shared by the images of one run."""

    def __init__(self, args: argparse.Namespace, background: _Model, depth: _Model, normal: _Model):
        self.args = args
        self.models = {"background": background, "depth": depth, "normal": normal}
        self._loaded: dict[str, object] = {}

    def _get(self, name: str):
        if name not in self._loaded:
            model = self.models[name]
            if name == "background":
                rembg = _import_rembg()
                folder = str(model.path.resolve().parent)
                # Recent rembg loads a custom model only from inside its model home (a guard for its HTTP
                # server); here the user names the file, so make its folder the home while the session loads.
                try:
                    with _environ(U2NET_HOME=folder, REMBG_HOME=folder):
                        self._loaded[name] = rembg.new_session("u2net_custom", model_path=str(model.path.resolve()))
                except Exception as exc:
                    raise PreprocessError(f"could not load {model.what} {model.path} ({model.flag}): {exc}") from None
            else:
                self._loaded[name] = _OnnxEstimator(model)
        return self._loaded[name]

    def matte(self, rgb: np.ndarray) -> np.ndarray:
        """(h, w) uint8 foreground matte of an (h, w, 3) uint8 photo, from rembg (``only_mask``: the colour is
        kept straight, rembg's own cut-out would be premultiplied onto black)."""
        session = self._get("background")
        rembg = _import_rembg()
        mask = np.asarray(rembg.remove(Image.fromarray(rgb), session=session, only_mask=True).convert("L"))
        if mask.shape != rgb.shape[:2]:
            raise PreprocessError(f"the background model gave a {mask.shape} mask for a {rgb.shape[:2]} image")
        return mask

    def depth(self, rgb: np.ndarray, mask: np.ndarray, source: Path) -> np.ndarray:
        """(h, w) float64, larger = farther, min-max normalised to [0, 1] over ``mask``, 0 outside."""
        a = self.args
        disparity = a.depth_output == "disparity"
        d = self._get("depth")(rgb, a.depth_input_size, a.depth_mean, a.depth_std, clamp=not disparity)
        if d.shape[0] != 1:
            raise PreprocessError(f"the depth model gave {d.shape[0]} channels; expected 1")
        inside = d[0][mask].astype(np.float64)
        if not np.all(np.isfinite(inside)) or inside.max() <= inside.min():
            raise PreprocessError(f"the depth model's output for {source} is constant or not finite inside the object")
        unit = (d[0] - inside.min()) / (inside.max() - inside.min())
        return np.where(mask, 1.0 - unit if disparity else unit, 0.0)

    def normal(self, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(h, w, 3) float in [0, 1] (model channel order), 0 outside ``mask``."""
        a = self.args
        n = self._get("normal")(rgb, a.depth_input_size, a.normal_mean, a.normal_std, clamp=True)
        if n.shape[0] != 3:
            raise PreprocessError(f"the normal model gave {n.shape[0]} channels; expected 3")
        # The bicubic resize overshoots [0, 1] near edges; the official uint8 cast would wrap those values.
        return np.where(mask[..., None], np.clip(n.transpose(1, 2, 0), 0.0, 1.0), 0.0)


# ------------------------------------------------------------------------------------------- driver


def _process(image: Path, alpha_known: np.ndarray | None, rgb: np.ndarray, pre: _Preprocessor,
             args: argparse.Namespace) -> dict[str, Image.Image]:
    """The output images of one input, keyed by kind (only those this run writes)."""
    alpha = alpha_known if alpha_known is not None else pre.matte(rgb)
    mask = alpha > 0
    if not mask.any():
        raise PreprocessError(f"no object found in {image}: the alpha / background matte is 0 everywhere")
    depth = pre.depth(rgb, mask, image) if pre.models["depth"].path else None
    normal = pre.normal(rgb, mask) if pre.models["normal"].path else None

    if args.recenter:
        f_rgb, f_alpha, depth, normal = frame_cutout(rgb / 255.0, alpha / 255.0, args.size, args.size,
                                                     args.border_ratio, depth=depth, normal=normal, path=image)
        rgb8 = np.round(f_rgb * 255).astype(np.uint8)
        alpha8 = np.round(f_alpha * 255).astype(np.uint8)
    else:
        rgb8, alpha8 = rgb, alpha
    mask = alpha8 > 0  # the written file's mask: depth and normal are defined exactly there
    out = {"rgba": Image.fromarray(np.dstack([rgb8, alpha8]))}
    if depth is not None:
        inside = depth[mask]
        lo, hi = inside.min(), inside.max()
        unit = np.where(mask, (depth - lo) / (hi - lo) if hi > lo else 0.0, 0.0)  # a no-op but for rounding
        out["depth"] = Image.fromarray(np.round(unit * _DEPTH_MAX).astype(np.uint16))
    if normal is not None:
        normal8 = np.where(mask[..., None], np.round(normal * 255), 0).astype(np.uint8)
        out["normal"] = Image.fromarray(np.ascontiguousarray(normal8[..., ::-1]))  # cv2's order on disk
    return out


def _write(images: dict[str, Image.Image], paths: dict[str, Path]) -> None:
    """Writes each image to a temporary file beside its target, then renames: no half-written outputs."""
    for kind, im in images.items():
        target = paths[kind]
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            im.save(tmp, format="PNG")
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PreprocessError(f"could not write {target}: {exc}") from None
        print(f"wrote {target}")


def _inputs(paths: Sequence[str]) -> list[Path]:
    """Image files named on the command line; a folder contributes its .png / .jpg files that are not outputs."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(
                f for f in p.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(f.stem.endswith(f"_{kind}") for kind in OUTPUT_KINDS)
            )
        elif p.is_file():
            found.append(p)
        else:
            raise PreprocessError(f"input not found: {p}")
    if not found:
        raise PreprocessError(f"no .png / .jpg images found in {', '.join(paths)}")
    return found


def _model(value: str | None, flag: str, env: str, what: str) -> _Model:
    raw = value or os.environ.get(env) or None
    return _Model(Path(raw).expanduser() if raw else None, flag, env, what)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dreamcraft_jax.preprocess",
        description="Cut out, frame and estimate depth / normals for a reference photo: writes <name>_rgba.png, "
                    "<name>_depth.png (with a depth model) and <name>_normal.png (with a normal model).",
    )
    p.add_argument("images", nargs="+", help="image files, or folders (their .png / .jpg files that are not outputs)")
    p.add_argument("--size", type=int, default=1024, help="side of the square output when re-centring")
    p.add_argument("--border_ratio", type=float, default=0.1,
                   help="empty part of the frame along the object's longer side (0.1: the object spans 90 %%)")
    p.add_argument("--no-recenter", dest="recenter", action="store_false",
                   help="keep the photo's framing and size (--size and --border_ratio are then unused)")
    p.add_argument("--out_dir", default=None, help="folder for the outputs (default: beside each input)")
    p.add_argument("--background_model", default=None,
                   help=f"rembg-compatible U^2-Net-style ONNX file, e.g. u2net.onnx (or ${ENV_BACKGROUND}); "
                        "needed only for inputs without transparency")
    p.add_argument("--depth_model", default=None, help=f"monocular depth ONNX file (or ${ENV_DEPTH}); optional")
    p.add_argument("--depth_output", choices=("depth", "disparity"), default="depth",
                   help="what the depth model outputs: depth, larger = farther (Omnidata) or disparity, larger = "
                        "nearer (MiDaS / DPT / Depth-Anything)")
    p.add_argument("--normal_model", default=None, help=f"normal ONNX file (or ${ENV_NORMAL}); optional")
    p.add_argument("--depth_input_size", type=int, default=384, help="square input size of the depth / normal models")
    norm = "1 or 3 comma-separated values; the model sees (x - mean) / std, x in [0, 1]"
    p.add_argument("--depth_mean", type=_floats, default=[0.5], help=f"{norm} (default 0.5, Omnidata's)")
    p.add_argument("--depth_std", type=_floats, default=[0.5], help="(default 0.5, Omnidata's)")
    p.add_argument("--normal_mean", type=_floats, default=[0.0], help="(default 0: Omnidata's normal model has none)")
    p.add_argument("--normal_std", type=_floats, default=[1.0], help="(default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.size < MIN_SIZE:
        raise PreprocessError(f"--size must be at least {MIN_SIZE}, got {args.size}")
    if not 0.0 <= args.border_ratio < 1.0:
        raise PreprocessError(f"--border_ratio must be in [0, 1), got {args.border_ratio}")
    if args.depth_input_size < 1:
        raise PreprocessError(f"--depth_input_size must be positive, got {args.depth_input_size}")
    if any(s == 0 for s in args.depth_std + args.normal_std):
        raise PreprocessError("--depth_std / --normal_std must not be 0")

    images = _inputs(args.images)
    background = _model(args.background_model, "--background_model", ENV_BACKGROUND, "background model")
    depth = _model(args.depth_model, "--depth_model", ENV_DEPTH, "depth model")
    normal = _model(args.normal_model, "--normal_model", ENV_NORMAL, "normal model")
    for m in (background, depth, normal):
        m.check()

    # Every check before any model runs or any file is written.
    writes = {"rgba"} | ({"depth"} if depth.path else set()) | ({"normal"} if normal.path else set())
    planned = {image: outputs_for(image, args.out_dir) for image in images}
    seen: dict[Path, Path] = {}
    for image, outs in planned.items():
        key = outs["rgba"].resolve()
        if key in seen:
            raise PreprocessError(f"{seen[key]} and {image} would write the same files ({outs['rgba'].name})")
        seen[key] = image
    existing = [p for outs in planned.values() for p in outs.values() if p.exists()]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        names = ", ".join(str(p) for p in existing[:3]) + more
        raise PreprocessError(f"refusing to overwrite {names}; pass --overwrite to replace them (nothing was written)")
    # Decoded again when processed: a folder of large photos is not held in memory at once.
    need_matte = [image for image in images if read_photo(image)[1] is None]
    if need_matte and background.path is None:
        raise PreprocessError(
            f"{need_matte[0]} has no transparency, so its background must be removed: pass --background_model "
            f"PATH (a rembg-compatible ONNX file such as u2net.onnx) or set ${ENV_BACKGROUND}; an RGBA cut-out "
            "with a transparent background needs no model"
        )
    if need_matte:
        _import_rembg()
    if depth.path or normal.path:
        _import_onnxruntime()
    if depth.path is None:
        print(f"no depth model (--depth_model or ${ENV_DEPTH}): no depth map written; depth is optional for "
              "training")
    if normal.path is None:
        print(f"no normal model (--normal_model or ${ENV_NORMAL}): no normal map written")

    pre = _Preprocessor(args, background, depth, normal)
    if args.out_dir is not None:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for image in images:
        rgb, alpha = read_photo(image)
        print(f"{image}: {'using its alpha' if alpha is not None else 'removing the background'}")
        _write(_process(image, alpha, rgb, pre, args), planned[image])
        for kind in OUTPUT_KINDS:
            stale = planned[image][kind]
            if kind not in writes and stale.exists():  # would not match the new RGBA (--overwrite given)
                stale.unlink()
                print(f"removed {stale} (not produced by this run; it would not match the new RGBA)")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 after one ``error:`` line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (PreprocessError, ReferenceImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
