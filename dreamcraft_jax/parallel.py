"""Device mesh and sharding rules: the one place that decides what is split across devices.

Mesh axes:
  ``data``  views (and prompts): each device renders and scores its share of the step's views.
  ``fsdp``  parameter sharding of large guidance / fine-tuned UNets: a leaf split along ``fsdp`` is all-gathered
            inside the step just before use (:func:`gather_fsdp`), so each device stores 1/fsdp of it.

Per-view arrays (cameras, per-view rng keys) are split over *all* devices (axes ``data`` x ``fsdp``) on their
leading axis, and gradients and metrics are averaged with ``pmean`` over both axes (:data:`VIEW_AXES`).
Parameter trees are placed by **sharding rules** held in the config (``parallel.rules``, :func:`rules_from_config`):
``(regex, rule)`` pairs matched against a leaf's path, first match wins (big_vision's convention). A path is the
tree's name and its keys joined by ``/``: ``params/encoding``, ``opt_state/0/mu/sdf_net/layers_0/kernel``,
``priors/sd/unet/down_blocks_0/.../kernel``. A rule is ``"replicated"``, ``"fsdp"`` (split the largest axis
divisible by the ``fsdp`` size when the leaf has at least ``parallel.fsdp_min_size`` elements: :func:`fsdp_spec`),
or an explicit spec, one entry per axis separated by commas (``"fsdp,None"``; empty or ``None`` = not split).
Default (:data:`DEFAULT_RULES`): LoRA weights and the 3D scene replicated, prior weights FSDP. The same code runs
on 1 and N devices: a step on N devices equals the 1-device step on the same views up to float summation order.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
VIEW_AXES = (DATA, FSDP)  # views are split over every device; grads are pmean'd over both axes
VIEWS = P(VIEW_AXES)  # leading axis of per-view arrays
REPLICATED = P()


def maybe_initialize_distributed(cfg) -> None:
    """Multi-host: ``jax.distributed.initialize()`` when ``cfg.parallel.distributed`` (cluster auto-detected)."""
    if cfg.parallel.distributed:
        jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all). data = -1 takes all devices not used by fsdp.

    Axes are Auto (not Explicit) so that jit propagates shardings from the inputs we place.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ValueError(f"parallel.fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices; {len(devices)} available")
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_config(cfg) -> Mesh:
    return make_mesh(int(cfg.parallel.data), int(cfg.parallel.fsdp))


def view_shards(mesh: Mesh) -> int:
    """Number of devices the views of one step are split over (data x fsdp)."""
    return int(mesh.shape[DATA]) * int(mesh.shape[FSDP])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, REPLICATED)


def along_views(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, VIEWS)


def replicate(tree, mesh: Mesh):
    """Place every array of ``tree`` on all devices of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def as_varying(tree, axis=VIEW_AXES):
    """Mark replicated values as device-varying along ``axis`` inside shard_map.

    Differentiating a loss w.r.t. a replicated (invariant) input inside shard_map makes JAX psum the gradient
    implicitly. Taking the gradient w.r.t. a varying copy instead keeps per-device gradients, which the caller
    averages explicitly with ``pmean``: the mean over all views whatever the device count. No axes: unchanged.
    """
    if not axis:
        return tree
    axes = (axis,) if isinstance(axis, str) else tuple(axis)

    def cast(x):
        missing = tuple(a for a in axes if a not in varying_axes(x))  # e.g. an all-gathered FSDP leaf
        if not missing:
            return x
        if hasattr(jax.lax, "pcast"):  # jax >= 0.12
            return jax.lax.pcast(x, missing, to="varying")
        return jax.lax.pvary(x, missing)

    return jax.tree.map(cast, tree)


def varying_axes(x) -> frozenset:
    """The mesh axes ``x`` varies along inside shard_map, empty elsewhere (also for the Pallas kernels, which
    declare their outputs with them). jax 0.12 keeps them in ``aval.manual_axis_type`` (``aval.mat`` is an
    alias of it in some versions), older versions in ``aval.vma``."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is None:
        mat = getattr(aval, "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def stacked_spec(x) -> P:
    """Inside shard_map: the out/in spec that carries per-device ``x``, given a leading axis of 1 (``x[None]``),
    out of one shard_map and into the next with the same device-varying type: split along the view axes ``x``
    varies along, replicated along the others (``P()`` for a device-invariant ``x``)."""
    axes = tuple(a for a in VIEW_AXES if a in varying_axes(x))
    return P(axes) if axes else REPLICATED


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 1 << 16) -> P:
    """FSDP rule for one parameter: split its largest axis divisible by the ``fsdp`` size, if it is big enough.

    Small leaves (norm scales, biases, below ``min_size`` elements) and leaves with no divisible axis stay
    replicated: sharding them saves nothing and costs a gather each.
    """
    size = 1
    for d in shape:
        size *= d
    if fsdp_size <= 1 or size < min_size:
        return REPLICATED
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return REPLICATED
    axis = max(candidates, key=lambda i: shape[i])
    return P(*[FSDP if i == axis else None for i in range(len(shape))])


def param_shardings(params, mesh: Mesh, min_size: int = 1 << 16):
    """NamedShardings for a params tree: FSDP-split along ``fsdp`` where that axis has size > 1, else replicated."""
    n = int(mesh.shape[FSDP]) if FSDP in mesh.axis_names else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_size)), params)


def fsdp_specs(params, mesh: Mesh, min_size: int = 1 << 16):
    """PartitionSpecs of :func:`param_shardings` (for shard_map in_specs)."""
    return jax.tree.map(lambda s: s.spec, param_shardings(params, mesh, min_size))


def gather_fsdp(params, specs):
    """Inside shard_map: all-gather every leaf split along ``fsdp`` (its spec names FSDP) back to full size."""

    def gather(x, spec):
        for axis, name in enumerate(spec):
            if name == FSDP:
                return jax.lax.all_gather(x, FSDP, axis=axis, tiled=True)
        return x

    if isinstance(specs, P):  # one spec for the whole tree
        return jax.tree.map(lambda x: gather(x, specs), params)
    # specs first: a PartitionSpec is a tuple, which must stay a leaf here.
    return jax.tree.map(lambda spec, x: gather(x, spec), specs, params, is_leaf=lambda s: isinstance(s, P))


def reduce_grads(grads, specs=REPLICATED):
    """Inside shard_map: per-device gradients -> their mean over every device, each leaf as its param is placed:
    ``pmean`` over the view axes for a whole leaf; for a leaf split along ``fsdp`` (its spec names FSDP at axis
    ``a``), the mean over ``data`` then a reduce-scatter along ``fsdp`` (this device's slice of the sum, divided
    by the ``fsdp`` size)."""

    def reduce(spec, g):
        for axis, name in enumerate(spec):
            if name == FSDP:
                g = jax.lax.pmean(g, DATA)
                return jax.lax.psum_scatter(g, FSDP, scatter_dimension=axis, tiled=True) / jax.lax.axis_size(FSDP)
        return jax.lax.pmean(g, VIEW_AXES)

    if isinstance(specs, P):
        return jax.tree.map(lambda g: reduce(specs, g), grads)
    return jax.tree.map(reduce, specs, grads, is_leaf=lambda s: isinstance(s, P))


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` with our mesh (kept here so every sharded call goes through one place)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# (regex over a leaf's path, rule); first match wins. See the module docstring.
DEFAULT_RULES = (
    (r".*lora.*", "replicated"),  # LoRA weights: small, updated every step
    (r"^(params|opt_state|extras)/.*", "replicated"),  # the 3D scene and its optimiser state
    (r"^priors/.*", "fsdp"),  # frozen prior weights: split along `fsdp`, gathered just before use
    (r".*", "replicated"),
)


def parse_rule(rule: str, ndim: int) -> str | P:
    """"replicated" / "fsdp" as they are; an explicit "a,b,..." -> PartitionSpec (one entry per axis)."""
    if rule in ("replicated", "fsdp"):
        return rule
    entries = [e.strip() for e in rule.split(",")]
    if len(entries) != ndim or any(e not in ("", "None", DATA, FSDP) for e in entries):
        raise ValueError(f"sharding rule {rule!r}: expected 'replicated', 'fsdp' or one entry per axis of a "
                         f"{ndim}-d leaf, each '{FSDP}', '{DATA}', 'None' or empty")
    return P(*[None if e in ("", "None") else e for e in entries])


def check_rules(rules) -> tuple[tuple[str, str], ...]:
    """``rules`` as a tuple of (regex, rule) pairs; raises ValueError naming the first bad pair."""
    import re

    out = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise ValueError(f"sharding rule {item!r}: expected a pair (regex, rule) of strings")
        try:
            re.compile(item[0])
        except re.error as e:
            raise ValueError(f"sharding rule {item!r}: bad regex ({e})") from None
        if item[1] not in ("replicated", "fsdp"):
            parse_rule(item[1], len(item[1].split(",")))
        out.append((item[0], item[1]))
    return tuple(out)


def rules_from_config(parallel_cfg) -> tuple[tuple[str, str], ...]:
    """``parallel.rules`` of the config, checked."""
    return check_rules(parallel_cfg.rules)


def leaf_paths(tree, name: str):
    """The tree of ``name/key/key/...`` strings of ``tree``'s leaves."""

    def key_str(k) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join([name, *(key_str(k) for k in path)]), tree)


def rule_specs(tree, name: str, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = 1 << 16):
    """PartitionSpecs of ``tree``'s leaves by the first rule whose regex matches the leaf's path."""
    import re

    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
    n = int(mesh.shape[FSDP]) if FSDP in mesh.axis_names else 1

    def spec(path: str, x):
        shape = tuple(getattr(x, "shape", ()))
        for pattern, rule in compiled:
            if pattern.fullmatch(path):
                parsed = parse_rule(rule, len(shape))
                if parsed == "replicated":
                    return REPLICATED
                if parsed == "fsdp":
                    return fsdp_spec(shape, n, min_size)
                for axis, entry in enumerate(parsed):
                    size = int(mesh.shape[entry]) if entry else 1
                    if shape[axis] % size:
                        raise ValueError(f"sharding rule {rule!r} for {path}: axis {axis} of size {shape[axis]} "
                                         f"does not divide over the {size} devices of mesh axis {entry!r}")
                return parsed
        return REPLICATED

    return jax.tree.map(spec, leaf_paths(tree, name), tree)


def place(tree, name: str, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = 1 << 16):
    """``tree`` on the mesh as the rules say: (placed tree, its PartitionSpecs)."""
    specs = rule_specs(tree, name, mesh, rules, min_size)
    placed = jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                is_leaf=lambda s: isinstance(s, P)))
    return placed, specs
