"""The coarse-stage density field: hash grid -> density MLP and feature MLP (threestudio "implicit-volume").

Pure functions over a params pytree ``{"encoding": (P, F) table, "density_net": ..., "feature_net": ...}``.
Points are world coordinates inside the box [-r, r]^3; the hash grid sees them mapped to [0, 1]^3.

density  sigma(x) = act(density_net(enc(x)) + bias(x)), act = softplus (official) or exp,
         blob_magic3d bias(x) = s * (1 - |x| / std)  (s = 10, std = 0.5): a dense blob at the centre at init;
         blob_dreamfusion bias(x) = s * exp(-|x|^2 / (2 std^2)).
albedo   sigmoid(feature_net(enc(x))[:3]).
normal   -normalize(grad sigma), grad by central finite differences with step ``eps`` (6 extra density
         evaluations per point; official eps 0.01) or by autodiff ("analytic").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dreamcraft_jax.fields import hashgrid
from dreamcraft_jax.fields.mlp import MLP, apply_mlp, init_mlp
from dreamcraft_jax.kernels import density as density_kernel
from dreamcraft_jax.kernels import fd_hashgrid as fd_kernel
from dreamcraft_jax.kernels import hashgrid as hashgrid_kernel
from dreamcraft_jax.kernels import hashgrid_levels as levels_kernel
from dreamcraft_jax.kernels import mlp as mlp_kernel
from dreamcraft_jax.kernels.spec import (
    HASHGRID_BACKWARDS,  # noqa: F401  (re-exported: config.py checks with it)
    REFERENCE_KERNELS,
    KernelSpec,
)

# The kernels are called through their modules (``hashgrid_kernel.encode_pallas``, not a bound name), so that a
# test can wrap one with a spy.

DENSITY_ACTIVATIONS = ("softplus", "exp")
# "reduced" backward: levels up to this grid scale (levels 0-5 of the official grid, cells >= 1/101 of the box)
# pre-reduce per block of packed samples before their atomics; finer levels scatter point by point.
PRE_REDUCE_MAX_SCALE = 128.0
DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion", "none")
NORMAL_TYPES = ("finite_difference", "finite_difference_laplacian", "analytic")


@dataclasses.dataclass(frozen=True)
class NerfFieldSpec:
    """Static (hashable) description of the field; build it with :meth:`from_config` outside jit."""

    grid: hashgrid.HashGridSpec
    radius: float = 2.0
    mlp_width: int = 64
    mlp_hidden_layers: int = 1
    n_feature_dims: int = 3
    density_activation: str = "softplus"
    density_bias: str = "blob_magic3d"
    density_blob_scale: float = 10.0
    density_blob_std: float = 0.5
    normal_type: str = "finite_difference"
    finite_difference_eps: float = 0.01
    progressive_start_level: int = 8
    progressive_start_step: int = 2000
    progressive_update_steps: int = 500
    remat_encoding: bool = True
    # The kernel choices, filled from the run's KernelSpec by from_config (kernels/spec.py has what each means).
    backend: str = "xla"  # hash-grid encoding: "xla" (jnp) or "pallas" (dreamcraft_jax.kernels.hashgrid)
    hashgrid_backward: str = "xla"  # Pallas backend only: HASHGRID_BACKWARDS (XLA scatter-add or atomic kernel)
    fused_density: bool = True  # Pallas backend only: the no-grad pruning density as one encode+MLP kernel
    fused_finite_difference: bool = False  # Pallas backend only: the 6 neighbours' encodings in one kernel
    fused_mlp: bool = False  # Pallas backend only: density / SDF and albedo MLPs forward / backward, one kernel each
    fused_mlp_precision: str = "tf32"  # their matmuls' input precision on the GPU (kernels.mlp.PRECISIONS)
    encoder_per_level: bool = False  # Pallas backend, atomic backwards: the encoder as one program per level
    fd_columns: bool = False  # finite-difference kernel in the transposed (L*F, N) layout (kernels.fd_columns)

    @classmethod
    def from_config(cls, cfg, kernels: KernelSpec = REFERENCE_KERNELS) -> NerfFieldSpec:
        """cfg: the ``field`` ConfigDict (see dreamcraft_jax/config.py); kernels: the run's kernel choices
        (``KernelSpec.from_config(cfg.kernels)``; None means ``KernelSpec()``, the jnp reference)."""
        kernels = REFERENCE_KERNELS if kernels is None else kernels
        return cls(
            backend=kernels.backend,
            hashgrid_backward=kernels.hashgrid_backward,
            fused_density=kernels.fused_density,
            fused_finite_difference=kernels.fused_finite_difference,
            fused_mlp=kernels.fused_mlp,
            fused_mlp_precision=kernels.fused_mlp_precision,
            encoder_per_level=kernels.encoder_per_level,
            fd_columns=kernels.fd_columns,
            grid=hashgrid.HashGridSpec.from_config(cfg.hashgrid),
            radius=float(cfg.radius),
            mlp_width=int(cfg.mlp_width),
            mlp_hidden_layers=int(cfg.mlp_hidden_layers),
            n_feature_dims=int(cfg.n_feature_dims),
            density_activation=cfg.density_activation,
            density_bias=cfg.density_bias,
            density_blob_scale=float(cfg.density_blob_scale),
            density_blob_std=float(cfg.density_blob_std),
            normal_type=cfg.normal_type,
            finite_difference_eps=float(cfg.finite_difference_eps),
            progressive_start_level=int(cfg.progressive.start_level),
            progressive_start_step=int(cfg.progressive.start_step),
            progressive_update_steps=int(cfg.progressive.update_steps),
            remat_encoding=bool(cfg.remat_encoding),
        )

    @property
    def density_net(self) -> MLP:
        return MLP(self.mlp_width, self.mlp_hidden_layers, 1)

    @property
    def feature_net(self) -> MLP:
        return MLP(self.mlp_width, self.mlp_hidden_layers, self.n_feature_dims)


def init_field(key, spec: NerfFieldSpec) -> dict:
    """Fresh parameters: hash table U(-1e-4, 1e-4), MLPs U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch nn.Linear)."""
    k_grid, k_density, k_feature = jax.random.split(key, 3)
    in_dim = spec.grid.output_dim
    return {
        "encoding": hashgrid.init_hashgrid(k_grid, spec.grid),
        "density_net": init_mlp(k_density, spec.density_net, in_dim),
        "feature_net": init_mlp(k_feature, spec.feature_net, in_dim),
    }


def level_mask(step, spec: NerfFieldSpec) -> jax.Array:
    """(L,) progressive-band mask of the hash grid at training ``step`` (traced ok)."""
    return hashgrid.progressive_level_mask(step, spec.grid, spec.progressive_start_level,
                                           spec.progressive_start_step, spec.progressive_update_steps)


def unit_coordinates(x: jax.Array, spec: NerfFieldSpec) -> jax.Array:
    """World points (..., 3) in the scene box [-radius, radius]^3 -> the hash grid's [0, 1]^3 (clipped)."""
    return jnp.clip((x + spec.radius) / (2.0 * spec.radius), 0.0, 1.0)


def density_bias(x: jax.Array, spec: NerfFieldSpec) -> jax.Array:
    """(N, 3) -> (N,) the density initialisation bias added before the activation."""
    if spec.density_bias == "blob_magic3d":
        return spec.density_blob_scale * (1.0 - jnp.linalg.norm(x, axis=-1) / spec.density_blob_std)
    if spec.density_bias == "blob_dreamfusion":
        r2 = jnp.sum(x * x, axis=-1)
        return spec.density_blob_scale * jnp.exp(-0.5 * r2 / spec.density_blob_std ** 2)
    return jnp.zeros(x.shape[:-1], x.dtype)


def _activate(raw: jax.Array, spec: NerfFieldSpec) -> jax.Array:
    if spec.density_activation == "exp":
        return jnp.exp(jnp.minimum(raw, 15.0))  # clamp: exp overflows in fp32 above ~88, grads well before
    return jax.nn.softplus(raw)


def encode_points(table: jax.Array, unit: jax.Array, grid: hashgrid.HashGridSpec, mask, *, backend: str,
                  remat: bool, need_x_grad: bool, valid: jax.Array | None = None,
                  backward: str = "xla", per_level: bool = False, first_order_x_grad: bool = False) -> jax.Array:
    """Hash-grid features of points in [0, 1]^3 through the chosen backend.

    The Pallas kernel keeps only (table, x, mask) for its backward, so it needs no remat; its backward skips the
    gradient w.r.t. x unless ``need_x_grad`` (analytic normals differentiate through x). ``valid`` (N,) bool
    marks the points that matter: the others get zero features and cost no table traffic in either pass.
    ``backward`` ("xla" | "atomic" | "reduced") picks the Pallas backward: XLA's scatter-add, the atomic kernel,
    or the atomic kernel with a per-block pre-reduction of the coarse levels (``PRE_REDUCE_MAX_SCALE``).
    ``per_level`` (with an atomic backward): the encoder with one level per program
    (:mod:`dreamcraft_jax.kernels.hashgrid_levels`, a 16x smaller Triton program).
    ``need_x_grad`` takes the jnp path, which any order of derivative goes through (analytic normals are a
    gradient that is differentiated again); ``first_order_x_grad`` keeps the Pallas kernel with its backward's
    gradient w.r.t. x (a surface point's texture lookup, differentiated once).
    """
    pre_reduce = PRE_REDUCE_MAX_SCALE if backward == "reduced" else 0.0
    if backend == "pallas" and first_order_x_grad and not need_x_grad:
        return hashgrid_kernel.encode_pallas(table, unit, grid, mask, grad_table_only=False, block_points=128,
                                             xla_backward=backward == "xla", valid=valid)
    if backend == "pallas" and not need_x_grad and per_level and backward != "xla":
        return levels_kernel.encode_levels_pallas(table, unit, grid, mask, valid, pre_reduce_max_scale=pre_reduce)
    if backend == "pallas" and not need_x_grad:
        return hashgrid_kernel.encode_pallas(table, unit, grid, mask, grad_table_only=True, block_points=128,
                                             xla_backward=backward == "xla", valid=valid,
                                             pre_reduce_max_scale=pre_reduce)
    # The level mask is a function of the step, never differentiated: switched-off levels can skip the table.
    encode = functools.partial(hashgrid.encode, spec=grid, skip_masked_levels=True)
    if remat:
        # The gather keeps (N, L, 8) rows, weights and corner features for the backward pass (~2 KB per
        # point at L=16); recomputing them from x in the backward pass bounds memory at 384 px with normals.
        encode = jax.checkpoint(encode)
    return encode(table, unit, level_mask=mask, valid=valid)


def encode(params: dict, x: jax.Array, spec: NerfFieldSpec, mask, valid=None,
           first_order_x_grad: bool = False) -> jax.Array:
    """(N, 3) scene points -> (N, L * F) hash-grid features of ``params["encoding"]`` (level ``mask`` (L,));
    ``first_order_x_grad``: see :func:`encode_points`."""
    return encode_points(params["encoding"], unit_coordinates(x, spec), spec.grid, mask, backend=spec.backend,
                         remat=spec.remat_encoding, need_x_grad=spec.normal_type == "analytic", valid=valid,
                         backward=spec.hashgrid_backward, per_level=spec.encoder_per_level,
                         first_order_x_grad=first_order_x_grad)


class FeatureColumns(NamedTuple):
    """Encodings in the finite-difference kernel's column layout (``kernels.fd_columns``): ``t`` (L*F, N). The
    fused MLP kernel reads them as they are (no transpose either way); any other consumer takes :meth:`rows`."""

    t: jax.Array

    def rows(self) -> jax.Array:
        return self.t.T


def field_mlp(module: MLP, net: dict, enc, spec: NerfFieldSpec, valid=None) -> jax.Array:
    """module(enc) (N, out_dim), enc (N, L*F) or :class:`FeatureColumns`: with ``spec.fused_mlp`` on the Pallas
    backend, one hidden layer, no bias and widths the kernel takes, :func:`dreamcraft_jax.kernels.mlp.mlp_pallas`
    (hidden layer in registers, forward and backward one kernel each; ``valid`` (N,): the samples whose features
    can be nonzero, the kernel's blocks without one skip their work); otherwise XLA's matmuls. Invalid samples have
    zero features, so both give 0 there (no bias)."""
    columns = isinstance(enc, FeatureColumns)
    features = enc.t if columns else enc
    if spec.backend == "pallas" and spec.fused_mlp and features.ndim == 2 and module.n_hidden_layers == 1 \
            and not module.use_bias and module.precision is None:
        if mlp_kernel.supported(features.shape[0 if columns else 1], module.width, module.out_dim):
            return mlp_kernel.mlp_pallas(features, net["layers_0"]["kernel"], net["layers_1"]["kernel"],
                                         valid=valid, precision=spec.fused_mlp_precision, columns=columns)
    return apply_mlp(module, net, enc.rows() if columns else enc)


def scalar_mlp(module: MLP, net: dict, enc: jax.Array, spec: NerfFieldSpec, valid=None) -> jax.Array:
    """:func:`field_mlp` of a scalar-output net (density, SDF): (N,)."""
    return field_mlp(module, net, enc, spec, valid)[..., 0]


def albedo_of_encoding(params: dict, enc: jax.Array, spec: NerfFieldSpec, valid=None) -> jax.Array:
    """(N, L*F) features -> (N, 3) albedo sigmoid(feature_net(enc)[:, :3]) in (0, 1)."""
    return jax.nn.sigmoid(field_mlp(spec.feature_net, params["feature_net"], enc, spec, valid)[..., :3])


def density(params: dict, x: jax.Array, spec: NerfFieldSpec, mask=None, valid=None,
            precision: jax.lax.Precision | None = None) -> jax.Array:
    """(N, 3) world points -> (N,) density sigma >= 0 (``valid`` (N,) bool: see :func:`encode_points`;
    ``precision``: of the density MLP's matmuls, None for XLA's default)."""
    enc = encode(params, x, spec, mask, valid)
    raw = scalar_mlp(spec.density_net.clone(precision=precision), params["density_net"], enc, spec, valid)
    return _activate(raw + density_bias(x, spec), spec)


def density_no_grad(params: dict, x: jax.Array, spec: NerfFieldSpec, mask=None, valid=None, *,
                    interpret: bool | None = None) -> jax.Array:
    """:func:`density` under ``stop_gradient``, for the renderer's pruning pass and occupancy-grid updates.

    With the Pallas backend and one hidden layer the hash-grid encoding and the density MLP run fused in one
    kernel (:mod:`dreamcraft_jax.kernels.density`: no (N, L*F) features or (N, H) activations in HBM); the bias
    and activation follow elementwise. Otherwise the unfused :func:`density`. Both compute the MLP in full
    float32 (the kernel's FMAs; ``Precision.HIGHEST`` for XLA, whose default may be TF32 on GPUs), so the two
    backends keep and drop the same samples at the alpha threshold, and render the same image.
    """
    sg = jax.lax.stop_gradient
    net = params["density_net"]
    fusable = spec.fused_density and spec.mlp_hidden_layers == 1 and not spec.mlp_width & (spec.mlp_width - 1)
    if spec.backend != "pallas" or not fusable:
        return sg(density(params, x, spec, mask, valid, precision=jax.lax.Precision.HIGHEST))
    raw = density_kernel.density_mlp_pallas(params["encoding"], unit_coordinates(sg(x), spec), spec.grid, mask, valid,
                                            net["layers_0"]["kernel"], net["layers_1"]["kernel"], interpret=interpret)
    return sg(_activate(raw + density_bias(sg(x), spec), spec))


def density_and_albedo(params: dict, x: jax.Array, spec: NerfFieldSpec, mask=None, valid=None):
    """(N, 3) -> (sigma (N,), albedo (N, 3) in (0, 1)); one shared encoding."""
    enc = encode(params, x, spec, mask, valid)
    raw = scalar_mlp(spec.density_net, params["density_net"], enc, spec, valid)
    sigma = _activate(raw + density_bias(x, spec), spec)
    return sigma, albedo_of_encoding(params, enc, spec, valid)


def fd_neighbours(normal_type: str) -> tuple:
    """(axis, sign) neighbours of a finite-difference ``normal_type`` (threestudio's names): ``finite_difference``
    = forward differences +x +y +z against the point's own value (the official setting), ``finite_difference_
    laplacian`` = central differences +x +y +z -x -y -z."""
    return fd_kernel.FORWARD if normal_type == "finite_difference" else fd_kernel.CENTRAL


def _fd_points(x: jax.Array, eps: float, neighbours, radius: float) -> jax.Array:
    """(N, K, 3) neighbour points ``x + sign eps e_axis``, clamped to the box [-radius, radius] as the official
    geometry does (the encoding clips to the grid anyway; the clamp also reaches the density bias)."""
    return jnp.clip(x[:, None, :] + jnp.asarray(fd_kernel.offsets(neighbours, eps))[None], -radius, radius)


def _difference(values: jax.Array, eps: float, center, valid: jax.Array | None) -> jax.Array:
    """(N, K) neighbour values -> (N, 3) gradient estimate, 0 where not valid.

    Forward (K = 3): (f(x + eps e) - f(x)) / eps with ``center`` = f(x) (N,); central (K = 6):
    (f(x + eps e) - f(x - eps e)) / 2 eps.
    """
    if values.shape[1] == 3:
        grad = (values - center[:, None]) / eps
    else:
        grad = (values[:, :3] - values[:, 3:]) / (2.0 * eps)
    return grad if valid is None else jnp.where(valid[:, None], grad, 0.0)


def finite_difference_gradient(fn, x: jax.Array, eps: float, radius: float, valid: jax.Array | None = None,
                               normal_type: str = "finite_difference", center=None) -> jax.Array:
    """(N, 3) -> (N, 3) gradient of a scalar field fn: (M, 3) -> (M,) by finite differences with step eps (see
    :func:`fd_neighbours`): one call of fn on the K N shifted points, point-major so a valid prefix of x stays a
    valid prefix. Forward differences use ``center`` = fn(x) (N,) when the caller has it, else one more call.

    With ``valid`` (N,) bool, fn is called as fn(points, valid_KN) and the gradient of invalid points is 0.
    """
    neighbours = fd_neighbours(normal_type)
    k = len(neighbours)
    points = _fd_points(x, eps, neighbours, radius).reshape(-1, 3)
    values = fn(points) if valid is None else fn(points, jnp.repeat(valid, k))
    if k == 3 and center is None:
        center = fn(x) if valid is None else fn(x, valid)
    return _difference(values.reshape(x.shape[0], k), eps, center, valid)


def uses_fd_kernel(spec: NerfFieldSpec, normal_type: str) -> bool:
    """Whether a field with this spec and ``normal_type`` takes its finite differences through
    :mod:`dreamcraft_jax.kernels.fd_hashgrid`."""
    return (spec.backend == "pallas" and spec.fused_finite_difference
            and normal_type in ("finite_difference", "finite_difference_laplacian"))


def _fd_kernel_encodings(table: jax.Array, x: jax.Array, spec: NerfFieldSpec, mask, valid, normal_type: str,
                         with_center: bool) -> tuple[jax.Array, ...]:
    """The (N, L*F) encodings of x's finite-difference neighbours from one kernel call, led by x's own encoding
    when ``with_center`` (the kernel reuses the own corners it gathers anyway: no extra table reads or atomics).
    With ``spec.hashgrid_backward == "reduced"`` the coarse levels' shared corners are also pre-reduced over each
    block of samples; otherwise each lane adds its own accumulated corners. With ``spec.fd_columns`` the kernel
    writes (and its backward reads) the transposed (L*F, N) layout, whose level rows are contiguous; the encodings
    come as :class:`FeatureColumns`, which the fused MLP kernel reads as they are (other consumers transpose)."""
    neighbours = ((fd_kernel.CENTER,) if with_center else ()) + fd_neighbours(normal_type)
    pre_reduce = PRE_REDUCE_MAX_SCALE if spec.hashgrid_backward == "reduced" else 0.0
    encodings = fd_kernel.fd_encode_pallas(table, x, spec.grid, spec.radius, spec.finite_difference_eps, mask, valid,
                                           neighbours=neighbours, pre_reduce_max_scale=pre_reduce,
                                           columns=spec.fd_columns)
    return tuple(FeatureColumns(e) for e in encodings) if spec.fd_columns else encodings


def _fd_gradient_of_encodings(encodings, x: jax.Array, spec: NerfFieldSpec, value_fn, valid, normal_type: str,
                              center) -> jax.Array:
    """(N, 3) finite-difference gradient from the neighbours' encodings (rows or :class:`FeatureColumns`, passed
    on to ``value_fn(encoding, points) -> (N,)`` as they are; forward differences: ``center`` = the value at x)."""
    eps = spec.finite_difference_eps
    points = _fd_points(x, eps, fd_neighbours(normal_type), spec.radius)
    values = jnp.stack([value_fn(enc, points[:, j]) for j, enc in enumerate(encodings)], axis=1)
    return _difference(values, eps, center, valid)


def fused_finite_difference_gradient(table: jax.Array, x: jax.Array, spec: NerfFieldSpec, value_fn, mask=None,
                                     valid=None, normal_type: str = "finite_difference", center=None) -> jax.Array:
    """:func:`finite_difference_gradient` of ``value_fn(encoding (N, L*F), points (N, 3)) -> (N,)`` with the
    neighbours' encodings from one kernel (shared corners gathered and scattered once; table gradient only, as
    the fields never differentiate positions here). Forward differences without ``center`` (the value at x, (N,))
    take x's own encoding from the same kernel call."""
    with_center = len(fd_neighbours(normal_type)) == 3 and center is None
    encodings = _fd_kernel_encodings(table, x, spec, mask, valid, normal_type, with_center)
    if with_center:
        center, encodings = value_fn(encodings[0], x), encodings[1:]
    return _fd_gradient_of_encodings(encodings, x, spec, value_fn, valid, normal_type, center)


def encoding_and_fd_gradient(table: jax.Array, x: jax.Array, spec: NerfFieldSpec, value_fn, mask=None,
                             valid=None, normal_type: str = "finite_difference"):
    """(x's own encoding (N, L*F), or :class:`FeatureColumns` with ``spec.fd_columns``, its value
    ``value_fn(enc, x)`` (N,), the finite-difference gradient (N, 3)) with every encoding from one kernel call: a
    main pass that needs features and normals (the renderer's, or NeuS's every pass) encodes x without the
    separate encoder (its table reads and backward atomics)."""
    enc, *encodings = _fd_kernel_encodings(table, x, spec, mask, valid, normal_type, with_center=True)
    value = value_fn(enc, x)
    return enc, value, _fd_gradient_of_encodings(encodings, x, spec, value_fn, valid, normal_type, value)


def _density_of_encoding(params: dict, spec: NerfFieldSpec, valid=None):
    def density_of(enc, points):
        raw = scalar_mlp(spec.density_net, params["density_net"], enc, spec, valid)
        return _activate(raw + density_bias(points, spec), spec)
    return density_of


def _unit_normals(grad: jax.Array) -> jax.Array:
    """-grad / |grad|: normals point out of the density (0 where grad is 0)."""
    return -grad / jnp.maximum(jnp.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


def density_albedo_and_normals(params: dict, x: jax.Array, spec: NerfFieldSpec, mask=None, valid=None):
    """(N, 3) -> (sigma (N,), albedo (N, 3), normals (N, 3)): :func:`density_and_albedo` and :func:`normals` with
    the centre's sigma reused; through the finite-difference kernel, x's own encoding comes from the same call."""
    if not uses_fd_kernel(spec, spec.normal_type):
        sigma, albedo = density_and_albedo(params, x, spec, mask, valid)
        return sigma, albedo, normals(params, x, spec, mask, valid, center=sigma)
    enc, sigma, grad = encoding_and_fd_gradient(params["encoding"], x, spec,
                                                _density_of_encoding(params, spec, valid), mask, valid,
                                                spec.normal_type)
    return sigma, albedo_of_encoding(params, enc, spec, valid), _unit_normals(grad)


def normals(params: dict, x: jax.Array, spec: NerfFieldSpec, mask=None, valid=None, center=None) -> jax.Array:
    """(N, 3) -> (N, 3) unit normals -grad(sigma) / |grad(sigma)| (0 where ``valid`` is False).

    ``center``: sigma at x (N,) when the caller has it (the renderer's main pass): forward differences reuse it,
    as the official geometry reuses its density, so a normal costs 3 field evaluations, not 4.
    """
    if spec.normal_type == "analytic":
        grad = jax.grad(lambda p: jnp.sum(density(params, p, spec, mask, valid)))(x)
    elif uses_fd_kernel(spec, spec.normal_type):
        grad = fused_finite_difference_gradient(params["encoding"], x, spec,
                                                _density_of_encoding(params, spec, valid), mask, valid,
                                                spec.normal_type, center)
    else:
        grad = finite_difference_gradient(lambda p, v=None: density(params, p, spec, mask, v), x,
                                          spec.finite_difference_eps, spec.radius, valid, spec.normal_type, center)
    return _unit_normals(grad)
