"""Sharding rules from the config (parallel.rules): a leaf's path picks its PartitionSpec, first match wins; on 8
CPU devices the rules place a field replicated, frozen prior UNets FSDP along `fsdp`, a trainable UNet and its
optimiser state FSDP, LoRA weights replicated; each device then holds the slice its spec says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from dreamcraft_jax import parallel
from dreamcraft_jax.config import ConfigError, validate

RULES = (
    (r".*lora.*", "replicated"),
    (r"^params/unet/.*", "fsdp"),
    (r"^opt_state/.*/unet/.*", "fsdp"),
    (r"^(params|opt_state|extras)/.*", "replicated"),
    (r"^priors/.*", "fsdp"),
    (r"^special/.*", "None,fsdp"),
)


def _trees():
    params = {"field": {"encoding": jnp.ones((4096, 2)), "mlp": jnp.ones((32, 64))},
              "unet": {"conv": {"kernel": jnp.ones((64, 3, 3, 32))}, "norm": {"scale": jnp.ones((64,))},
                       "attn": {"lora_up": jnp.ones((64, 8)), "lora_down": jnp.ones((8, 64))}}}
    priors = {"sd": {"unet": {"proj": {"kernel": jnp.ones((40, 48))}, "bias": jnp.ones((48,))}}}
    return params, priors


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_rules_place_each_tree_as_the_config_says():
    mesh = parallel.make_mesh(2, 4)  # data x fsdp
    params, priors = _trees()
    placed, specs = parallel.place(params, "params", mesh, RULES, min_size=256)
    assert specs["field"]["encoding"] == P() and specs["field"]["mlp"] == P()  # the field: replicated
    assert specs["unet"]["conv"]["kernel"] == P(parallel.FSDP, None, None, None)  # largest axis divisible by 4
    assert specs["unet"]["norm"]["scale"] == P()  # below fsdp_min_size: replicated even under "fsdp"
    assert specs["unet"]["attn"]["lora_up"] == P() and specs["unet"]["attn"]["lora_down"] == P()  # LoRA
    shard = placed["unet"]["conv"]["kernel"].addressable_shards[0].data
    assert shard.shape == (16, 3, 3, 32)  # each device holds a quarter along fsdp
    assert placed["field"]["encoding"].addressable_shards[0].data.shape == (4096, 2)

    # The trainable UNet's optimiser state follows its params; the field's stays replicated.
    opt_state = optax.adam(1e-3).init(params)
    _, opt_specs = parallel.place(opt_state, "opt_state", mesh, RULES, min_size=256)
    paths = jax.tree.leaves(parallel.leaf_paths(opt_state, "opt_state"))
    flat_specs = jax.tree.leaves(opt_specs, is_leaf=lambda s: isinstance(s, P))
    by_path = dict(zip(paths, flat_specs))
    assert by_path["opt_state/0/mu/unet/conv/kernel"] == P(parallel.FSDP, None, None, None)
    assert by_path["opt_state/0/nu/unet/conv/kernel"] == P(parallel.FSDP, None, None, None)
    assert by_path["opt_state/0/mu/field/encoding"] == P() and by_path["opt_state/0/count"] == P()

    # Frozen priors: FSDP on their largest divisible axis (48 over 4 devices: axis 1).
    placed_priors, prior_specs = parallel.place(priors, "priors", mesh, RULES, min_size=256)
    assert prior_specs["sd"]["unet"]["proj"]["kernel"] == P(None, parallel.FSDP)
    assert placed_priors["sd"]["unet"]["proj"]["kernel"].addressable_shards[0].data.shape == (40, 12)
    # An explicit per-axis rule.
    _, special = parallel.place({"w": jnp.ones((6, 8))}, "special", mesh, RULES)
    assert special["w"] == P(None, parallel.FSDP)
    with pytest.raises(ValueError, match="does not divide"):
        parallel.place({"w": jnp.ones((6, 6))}, "special", mesh, RULES)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_default_rules_keep_the_old_fsdp_heuristic_for_priors():
    """The default rules equal today's heuristic on the priors (fsdp_specs) and replicate the scene."""
    mesh = parallel.make_mesh(2, 4)
    params, priors = _trees()
    _, specs = parallel.place(priors, "priors", mesh, parallel.DEFAULT_RULES, min_size=256)
    assert specs == parallel.fsdp_specs(priors, mesh, 256)
    _, scene = parallel.place(params, "params", mesh, parallel.DEFAULT_RULES, min_size=256)
    assert all(s == P() for s in jax.tree.leaves(scene, is_leaf=lambda s: isinstance(s, P)))


def test_bad_rules_are_one_config_error():
    for rules, needle in ((((".*", "sideways"),), "expected 'replicated'"), ((("(", "fsdp"),), "bad regex"),
                          (("fsdp",), "pair")):
        cfg = tiny_config(**{"parallel.rules": rules})
        with pytest.raises(ConfigError, match=needle):
            validate(cfg)
    assert np.all([isinstance(r, tuple) for r in tiny_config().parallel.rules])
