"""Reading diffusers / transformers weights (config.json + safetensors) into Flax parameter trees.

No torch at run time: tensors come from ``safetensors.numpy``. Our Flax modules name their submodules after the
PyTorch attribute paths, so a checkpoint key maps to a Flax path by two rules:

* path: split on ".", glue a numeric part to the name before it: ``down_blocks.0.resnets.1.conv1.weight`` ->
  ``down_blocks_0 / resnets_1 / conv1 / <leaf>``;
* leaf: ``weight`` becomes whatever the Flax module holds there: ``kernel`` (linear: transposed; conv: OIHW ->
  OHWI, see :class:`dreamcraft_jax.models.layers.Conv2d`; a 1x1 conv loaded into a Dense is squeezed), ``scale``
  (norms) or ``embedding`` (embeddings); ``bias`` and any other leaf (e.g. ``class_embedding``) keep their name
  and layout.

Loading is strict: keys the module lacks (unexpected), parameters the checkpoint lacks (missing) and shape
mismatches are all reported together in one :class:`WeightLoadingError`, except for patterns the caller allows
(LoRA weights that start at zero, buffers such as ``position_ids``).

Folders: ``path`` may be a diffusers pipeline folder (``model_index.json`` + subfolders), the subfolder itself,
or a Hugging Face hub cache entry (``models--org--name`` with ``snapshots/<revision>/``); fp16 variants are files
named ``*.fp16.safetensors``.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class WeightLoadingError(ValueError):
    """Weights cannot be loaded; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------- folders


def _snapshot_dir(path: Path) -> Path:
    """A hub cache entry models--org--name -> its newest (or refs/main) snapshot folder."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise WeightLoadingError(f"{path} is a hub cache entry with no snapshot: download the model again")
    return candidates[-1]


def hub_cache_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """Where the Hugging Face hub caches ``repo_id`` (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)."""
    import os

    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or Path(
            os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def resolve_component_dir(path: str | Path, subfolder: str, config_names: tuple[str, ...] = ("config.json",)) -> Path:
    """Find the folder holding the config of one component (e.g. ``unet``; a scheduler's is
    ``scheduler_config.json``, a tokenizer's ``tokenizer_config.json``).

    ``path``: a pipeline folder, the component folder itself, a hub cache entry, or a hub id ``org/name``
    already in the local cache. Raises WeightLoadingError naming what is missing.
    """
    p = Path(path)
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        cached = hub_cache_dir(str(path))
        if cached.is_dir():
            p = cached
        else:
            raise WeightLoadingError(
                f"model {path!r} is neither a local folder nor in the Hugging Face cache ({cached}): download it "
                f"(e.g. `huggingface-cli download {path}`) or point the config at a local diffusers folder")
    if not p.exists():
        raise WeightLoadingError(f"weights folder {path} does not exist: point the config at a diffusers-format "
                                 f"folder holding {subfolder}/config.json")
    p = _snapshot_dir(p)
    for candidate in (p / subfolder, p):
        if any((candidate / name).is_file() for name in config_names):
            return candidate
    raise WeightLoadingError(f"no {subfolder}/{config_names[0]} under {path}: expected a diffusers pipeline folder "
                             f"(with {subfolder}/) or the {subfolder} folder itself")


def read_config(folder: Path, config_names: tuple[str, ...] = ("config.json",)) -> dict:
    """The first of ``config_names`` present in ``folder``, parsed."""
    path = next((folder / n for n in config_names if (folder / n).is_file()), folder / config_names[0])
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightLoadingError(f"cannot read {path}: {e}") from None


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of a component folder (sharded checkpoints via their index.json)."""
    suffixes = [f".{variant}.safetensors"] if variant else [".safetensors"]
    for name in WEIGHT_NAMES:
        for suffix in suffixes:
            single = folder / f"{name}{suffix}"
            if single.is_file():
                return [single]
            index = folder / f"{name}{suffix}.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [folder / s for s in shards]
    found = sorted(f.name for f in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(found)}; pass the matching variant)" if found else \
        " (only .bin / .ckpt files? convert them to safetensors first)"
    raise WeightLoadingError(f"no {'fp16 ' if variant else ''}safetensors weights in {folder}{hint}")


def _read_one(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            try:
                out[key] = f.get_tensor(key)
            except TypeError:
                # numpy has no bfloat16: read that tensor through the flax backend (ml_dtypes) instead.
                from safetensors.flax import load_file as load_flax

                return {k: np.asarray(v) for k, v in load_flax(str(path)).items()}
    return out


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for f in files:
        try:
            state.update(_read_one(f))
        except Exception as e:  # corrupt or truncated files
            raise WeightLoadingError(
                f"cannot read {f} ({type(e).__name__}: {e}): re-download or re-export it") from None
    return state


# ---------------------------------------------------------------------------------------------- conversion


def flax_path(torch_key: str) -> tuple[str, ...]:
    """``a.0.b.weight`` -> ("a_0", "b", "weight") (leaf renamed later against the Flax tree)."""
    out: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _convert_leaf(name: str, value: np.ndarray, holder: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    if name != "weight":
        return name, value
    if "kernel" in holder:
        target = holder["kernel"].shape
        # 4-D kernels are (out, kh, kw, in): layers.Conv2d, the layout cuDNN reads NHWC convolutions with.
        if value.ndim == 4 and len(target) == 4:
            return "kernel", np.transpose(value, (0, 2, 3, 1))  # OIHW -> OHWI
        if value.ndim == 4 and len(target) == 2:
            return "kernel", value[:, :, 0, 0].T  # 1x1 conv into Dense
        if value.ndim == 2 and len(target) == 4:
            return "kernel", value[:, None, None, :]  # Dense into 1x1 conv
        return "kernel", value.T
    if "scale" in holder:
        return "scale", value
    if "embedding" in holder:
        return "embedding", value
    return name, value


def convert_state_dict(state: Mapping[str, np.ndarray], abstract_params, *, what: str = "model",
                       ignore_unexpected: tuple[str, ...] = (), allow_missing: tuple[str, ...] = (),
                       dtype=None) -> dict:
    """PyTorch-named tensors -> a Flax params tree shaped like ``abstract_params``.

    abstract_params: the module's params (arrays or ShapeDtypeStructs, e.g. from ``jax.eval_shape``).
    ignore_unexpected / allow_missing: fnmatch patterns over dotted checkpoint keys / "/"-joined Flax paths.
    Missing-but-allowed leaves are zero-initialised: a caller adding LoRA must re-initialise the down
    projections (``layers.init_lora``, as ``load_unet`` does) or no gradient reaches either factor.
    """
    flat_target = {tuple(k): v for k, v in _flatten(abstract_params)}
    holders: dict[tuple[str, ...], dict] = {}
    for path, leaf in flat_target.items():
        holders.setdefault(path[:-1], {})[path[-1]] = leaf
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, mismatched_paths = [], [], set()
    for key, value in state.items():
        parts = flax_path(key)
        holder = holders.get(parts[:-1])
        if holder is None:
            if not any(fnmatch.fnmatch(key, p) for p in ignore_unexpected):
                unexpected.append(key)
            continue
        leaf, array = _convert_leaf(parts[-1], np.asarray(value), holder)
        path = parts[:-1] + (leaf,)
        if path not in flat_target:
            if not any(fnmatch.fnmatch(key, p) for p in ignore_unexpected):
                unexpected.append(key)
            continue
        if tuple(array.shape) != tuple(flat_target[path].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} -> {tuple(array.shape)}, "
                              f"model {tuple(flat_target[path].shape)}")
            mismatched_paths.add(path)
            continue
        out[path] = array
    missing = []
    for path, leaf in flat_target.items():
        if path in out or path in mismatched_paths:
            continue
        if any(fnmatch.fnmatch("/".join(path), p) for p in allow_missing):
            out[path] = np.zeros(leaf.shape, leaf.dtype)
        else:
            missing.append("/".join(path))
    if unexpected or missing or mismatched:
        lines = [f"cannot load {what}: the checkpoint does not match the model config"]
        for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        lines.append("  check that config.json belongs to these weights (and the folder to this model type)")
        raise WeightLoadingError("\n".join(lines))
    tree = _unflatten(out)
    if dtype is not None:
        tree = jax.tree.map(lambda a: a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a, tree)
    return tree


def place(params, mesh=None, shardings=None):
    """Put a host params tree on devices, each device receiving only its shard.

    With a ``mesh``: the rules of ``dreamcraft_jax.parallel.param_shardings`` (FSDP-split along ``fsdp`` when that
    axis has size > 1, replicated otherwise); or an explicit ``shardings`` tree.
    """
    if shardings is None and mesh is not None:
        from dreamcraft_jax.parallel import param_shardings

        shardings = param_shardings(params, mesh)
    if shardings is not None:
        return jax.device_put(params, shardings)
    return jax.tree.map(jnp.asarray, params)


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, tree


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


# ---------------------------------------------------------------------------------------------- export

# Module attributes that are Python lists in diffusers / transformers (``down_blocks.0``); every other
# ``name_N`` (``linear_1``, ``conv2``) is a plain attribute name.
LIST_ATTRIBUTES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                             "transformer_blocks", "to_out", "net", "layers"})


def torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`flax_path` for non-leaf parts: ("down_blocks_0", "resnets_1") -> "down_blocks.0.resnets.1"."""
    parts = []
    for part in path:
        m = re.fullmatch(r"(.+)_(\d+)", part)
        parts.extend([m.group(1), m.group(2)] if m and m.group(1) in LIST_ATTRIBUTES else [part])
    return ".".join(parts)


def to_state_dict(params) -> dict[str, np.ndarray]:
    """A Flax params tree -> PyTorch-named, PyTorch-laid-out float32 tensors (the inverse of
    :func:`convert_state_dict`); used to write diffusers-format folders of the demo priors."""
    out = {}
    for path, leaf in _flatten(params):
        value = np.asarray(leaf, np.float32)
        name = path[-1]
        if name == "kernel":
            value = np.transpose(value, (0, 3, 1, 2)) if value.ndim == 4 else value.T  # OHWI -> OIHW
            name = "weight"
        elif name in ("scale", "embedding"):
            name = "weight"
        out[f"{torch_key(path[:-1])}.{name}" if path[:-1] else name] = np.ascontiguousarray(value)
    return out


def save_component(folder: Path, config: dict, params, weights_name: str = "diffusion_pytorch_model") -> Path:
    """Write ``config.json`` + ``<weights_name>.safetensors`` (float32) for one component."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_state_dict(params), str(folder / f"{weights_name}.safetensors"))
    return folder
