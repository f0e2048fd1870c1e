"""The rasteriser's Pallas z-buffer (kernels/raster.py) against its jnp reference (render/raster.tile_zbuffer), in
interpret mode on the CPU: the same face per pixel and the same depth, bit for bit, on the scenes of
tests/test_raster.py (faces behind the camera, crossing near / far, off screen, degenerate, invalid, a backdrop)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_raster import H, W, random_scene

from dreamcraft_jax import parallel
from dreamcraft_jax.kernels import raster as kernel
from dreamcraft_jax.render import raster as R


def _binned(clip, faces, valid, tile):
    setup, bbox, live = R.triangle_setup(clip, faces, valid, H, W)
    pairs, cap = R.default_budgets(faces.shape[0], H, W, tile)
    faces_sorted, start, count, _ = R.bin_triangles(bbox, live, H, W, tile, pairs)
    return setup[faces_sorted], start, jnp.minimum(count, cap)


@pytest.mark.parametrize("seed,tile", [(0, 8), (1, 16)])
def test_tile_zbuffer_kernel_equals_the_reference(seed, tile):
    clip, faces, valid, _ = random_scene(seed)
    rows, start, count = jax.jit(functools.partial(_binned, tile=tile))(clip, faces, valid)
    assert int(jnp.max(count)) > 3  # tiles with several faces: the loop and the depth test are exercised
    best_ref, z_ref = R.tile_zbuffer(rows, start, count, H, W, tile, chunk=4)
    best, z = kernel.tile_zbuffer_pallas(rows, start, count, H, W, tile, interpret=True)
    np.testing.assert_array_equal(np.asarray(best), np.asarray(best_ref))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(z_ref))
    assert (np.asarray(best) >= 0).mean() > 0.5


def test_rasterize_with_the_kernel_gives_the_reference_raster():
    clip, faces, valid, _ = random_scene(2)
    outs = {zb: jax.jit(functools.partial(R.rasterize, height=H, width=W, tile=8, zbuffer=zb))(clip, faces, valid)
            for zb in ("xla", "pallas")}
    for name in ("tri_id", "bary", "depth", "overflow_pairs", "overflow_tiles"):
        np.testing.assert_array_equal(np.asarray(getattr(outs["pallas"], name)), np.asarray(getattr(outs["xla"], name)),
                                      err_msg=name)
    assert kernel.SETUP_WIDTH == R.SETUP_WIDTH


def test_kernel_runs_inside_shard_map_over_views():
    """Views split over 2 devices give the unsharded face ids. Executed with check_vma=False (Pallas interpret mode
    cannot lower a pallas_call under check_vma, as for the other kernels, tests/test_kernels_hashgrid.py); the
    check_vma=True program is traced, which type-checks the kernel call's outputs against the mesh axes."""
    clips, facess, valids = zip(*(random_scene(s)[:3] for s in (3, 4)))
    clip, faces, valid = jnp.stack(clips), facess[0], valids[0]
    mesh = parallel.make_mesh(2, 1)

    def views(c):
        return jax.vmap(lambda ci: R.rasterize(ci, faces, valid, H, W, tile=8, zbuffer="pallas").tri_id)(c)

    def sharded(check_vma):
        return jax.jit(jax.shard_map(views, mesh=mesh, in_specs=(parallel.VIEWS,), out_specs=parallel.VIEWS,
                                     check_vma=check_vma))

    got = np.asarray(sharded(False)(clip))
    want = np.asarray(jax.jit(jax.vmap(lambda ci: R.rasterize(ci, faces, valid, H, W, tile=8).tri_id))(clip))
    np.testing.assert_array_equal(got, want)
    assert sharded(True).trace(clip).out_info.shape == want.shape
