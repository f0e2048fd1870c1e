"""Device mesh and sharding rules: the one place that decides what is split across devices.

Mesh axes:
  ``data``  views (and prompts): each device renders and scores its share of the step's views.
  ``fsdp``  parameter sharding of large guidance / fine-tuned UNets: a leaf split along ``fsdp`` is all-gathered
            inside the step just before use (:func:`gather_fsdp`), so each device stores 1/fsdp of it.

Rules: the 3D scene (field params, optimiser state, occupancy grid, step, rng) is replicated; per-view arrays
(cameras, per-view rng keys) are split over *all* devices (axes ``data`` x ``fsdp``) on their leading axis, and
gradients and metrics are averaged with ``pmean`` over both axes (:data:`VIEW_AXES`); frozen prior params are
replicated or FSDP-split (:func:`fsdp_spec`). The same code runs on 1 and N devices: a step on N devices equals
the 1-device step on the same views up to float summation order.
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
    if hasattr(jax.lax, "pcast"):  # jax >= 0.12
        return jax.tree.map(lambda x: jax.lax.pcast(x, axis, to="varying"), tree)
    return jax.tree.map(lambda x: jax.lax.pvary(x, axis), tree)


def varying_axes(x) -> frozenset:
    """The mesh axes ``x`` varies along inside shard_map (jax >= 0.12 keeps them in ``aval.mat``, older in
    ``aval.vma``)."""
    aval = jax.typeof(x)
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

    # specs first: a PartitionSpec is a tuple, which must stay a leaf here.
    return jax.tree.map(lambda spec, x: gather(x, spec), specs, params, is_leaf=lambda s: isinstance(s, P))


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` with our mesh (kept here so every sharded call goes through one place)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
