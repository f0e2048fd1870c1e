"""Pallas kernel of the rasteriser's per-tile z-buffer: one program per screen tile, looping over its own face list.

Contract: :func:`tile_zbuffer_pallas` has the signature and the outputs of the pure-jnp reference
:func:`dreamcraft_jax.render.raster.tile_zbuffer` (which also documents the inputs): the faces' setup rows in
list order, each tile's list start and (capped) count, and it returns per pixel the list position of the nearest
covering face (-1: none) and its NDC depth (+inf: none), untiled to (ceil(H / tile) * tile, ceil(W / tile) * tile).
The coverage test, fill rule, near / far test and tie-break (the earlier list entry, i.e. the lower face index,
keeps an equal depth: the update is a strict ``<``) are the reference's, computed with the same expressions.

Where the reference advances every tile in lockstep (``chunk`` faces a step, as many steps as the longest list),
here each program runs its own list's length: a tile of 10 faces costs 10 iterations, whatever the busiest tile
holds. A face's 16 setup values are read as broadcast gathers (every lane the same address: one cached load).
No gradient: rasterisation is discrete (:func:`~dreamcraft_jax.render.raster.interpolate` differentiates).

Setup row layout (``SETUP_WIDTH`` = 16 columns): X_0..2, Y_0..2, w_0..2, z_0..2, orientation s, fill-rule flags
incl_0..2 (0 / 1); :func:`dreamcraft_jax.render.raster.triangle_setup` writes it (a test checks the two agree).
This module imports no renderer module (the renderer imports it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dreamcraft_jax.kernels.common import (
    cast_varying,
    compiler_params,
    gather,
    out_struct,
    resolve_interpret,
    whole_spec,
)
from dreamcraft_jax.parallel import varying_axes

__all__ = ["tile_zbuffer_pallas", "SETUP_WIDTH"]

SETUP_WIDTH = 16
_X, _Y, _W, _Z, _S, _INCL = 0, 3, 6, 9, 12, 13


def _kernel(start_ref, count_ref, setup_ref, best_ref, zbest_ref, *, tile: int, tiles_x: int, n_slots: int):
    t = pl.program_id(0)
    tt = tile * tile
    lanes = jax.lax.broadcasted_iota(jnp.int32, (tt,), 0)
    px = ((t % tiles_x) * tile + lanes % tile).astype(jnp.float32) + 0.5
    py = ((t // tiles_x) * tile + lanes // tile).astype(jnp.float32) + 0.5
    zero = jnp.zeros((tt,), jnp.int32)
    start = gather(start_ref, zero + t)  # (tt,) the same value in every lane
    count = gather(count_ref, zero + t)

    def body(k, carry):
        zbest, best = carry
        pos = jnp.minimum(start + k, n_slots - 1)

        def col(c):
            return gather(setup_ref, (pos, zero + c))

        X = [col(_X + i) for i in range(3)]
        Y = [col(_Y + i) for i in range(3)]
        W = [col(_W + i) for i in range(3)]
        Z = [col(_Z + i) for i in range(3)]
        s = col(_S)
        a = [X[i] - px * W[i] for i in range(3)]
        b = [Y[i] - py * W[i] for i in range(3)]
        e = (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])
        inside = jnp.ones((tt,), jnp.bool_)
        for i in range(3):
            se = s * e[i]
            inside = inside & ((se > 0) | ((se == 0) & (col(_INCL + i) > 0)))
        den = e[0] * W[0] + e[1] * W[1] + e[2] * W[2]
        zndc = (e[0] * Z[0] + e[1] * Z[1] + e[2] * Z[2]) / jnp.where(inside, den, 1.0)
        better = inside & (zndc >= -1.0) & (zndc <= 1.0) & (zndc < zbest)
        return jnp.where(better, zndc, zbest), jnp.where(better, start + k, best)

    init = (jnp.full((tt,), jnp.inf, jnp.float32), jnp.full((tt,), -1, jnp.int32))
    zbest, best = jax.lax.fori_loop(0, jnp.max(count), body, init)
    zbest_ref[...] = zbest
    best_ref[...] = jnp.where(zbest < jnp.inf, best, -1)


@functools.partial(jax.jit, static_argnames=("height", "width", "tile", "num_warps", "interpret"))
def tile_zbuffer_pallas(setup_sorted: jax.Array, tile_start: jax.Array, tile_count: jax.Array, height: int,
                        width: int, tile: int, *, num_warps: int = 4, interpret: bool | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """(best (Hp, Wp) int32, zbest (Hp, Wp) float32): see the module doc and the jnp reference."""
    interpret = resolve_interpret(interpret)
    if tile & (tile - 1) or tile < 4:
        raise ValueError(f"the Pallas z-buffer needs a power-of-two tile >= 4 (Triton vector sizes), got {tile}")
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    n_tiles, tt = tiles_x * tiles_y, tile * tile
    n_slots = setup_sorted.shape[0]
    rows = pl.BlockSpec((tt,), lambda i: (i,))
    # One set of mesh axes for every operand (inside shard_map the outputs vary over them: out_struct).
    operands = (tile_start.astype(jnp.int32), tile_count.astype(jnp.int32), setup_sorted.astype(jnp.float32))
    axes = frozenset().union(*(varying_axes(v) for v in operands))
    start, count, setup = (cast_varying(v, axes) for v in operands)
    best, zbest = pl.pallas_call(
        functools.partial(_kernel, tile=tile, tiles_x=tiles_x, n_slots=n_slots),
        out_shape=(out_struct((n_tiles * tt,), setup, jnp.int32), out_struct((n_tiles * tt,), setup)),
        grid=(n_tiles,),
        in_specs=[whole_spec((n_tiles,)), whole_spec((n_tiles,)), whole_spec(setup.shape)],
        out_specs=(rows, rows),
        compiler_params=compiler_params(num_warps, None),
        interpret=interpret,
        name="raster_tile_zbuffer",
    )(start, count, setup)

    def untile(q):
        return q.reshape(tiles_y, tiles_x, tile, tile).transpose(0, 2, 1, 3).reshape(tiles_y * tile, tiles_x * tile)

    return untile(best), untile(zbest)
