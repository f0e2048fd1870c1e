"""kernels.spec: the run's kernel choices as one explicit KernelSpec. From the config section (every key, "auto"
resolved, bad values refused naming the key); ``KernelSpec()`` is the reference path; two specs in one process
each get the GroupNorm path they ask for (no module-level switch); and the modules of kernels/, render/ and
fields/ import one another without a cycle."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamcraft_jax.kernels.spec import HASHGRID_BACKWARDS, KernelConfigError, KernelSpec, resolve_backend

ROOT = Path(__file__).resolve().parents[1]


def _kernels_dict():
    from dreamcraft_jax.config import base_config

    return base_config().kernels.to_dict()


def test_from_config_takes_every_key_of_the_config_section():
    from dreamcraft_jax.config import base_config

    cfg = base_config().kernels
    spec = KernelSpec.from_config(cfg)
    fields = {f.name for f in dataclasses.fields(KernelSpec)}
    assert set(cfg.keys()) == fields - {"groupnorm_sums_plan"}  # the plan override is not a config key
    for key in cfg.keys():
        want = resolve_backend(cfg[key]) if key == "backend" else cfg[key]
        assert getattr(spec, key) == want, key
    assert spec.backend == ("pallas" if jax.default_backend() == "gpu" else "xla")
    # Static and hashable: equal configs give equal specs, usable as a jit static argument.
    assert spec == KernelSpec.from_config(_kernels_dict()) and hash(spec) == hash(KernelSpec.from_config(cfg))
    assert jax.jit(lambda x, k: x + k.groupnorm_sums_max_rows, static_argnums=1)(1, spec) == 1 + (1 << 20)


def test_the_default_spec_is_the_reference_path():
    spec = KernelSpec()
    assert spec.backend == "xla" and spec.hashgrid_backward == "xla"
    assert not any((spec.fused_density, spec.fused_finite_difference, spec.fused_mlp, spec.fd_columns,
                    spec.encoder_per_level, spec.fused_groupnorm))
    assert spec.groupnorm_sums_max_rows == 0 and spec.groupnorm_sums_plan == ()


def test_auto_resolves_by_the_default_backend(monkeypatch):
    assert resolve_backend("pallas") == "pallas" and resolve_backend("xla") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert KernelSpec.from_config(_kernels_dict()).backend == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert KernelSpec.from_config(_kernels_dict()).backend == "pallas"


@pytest.mark.parametrize("key, value, allowed", [
    ("backend", "cuda", "one of 'auto', 'pallas', 'xla'"),
    ("hashgrid_backward", "fast", "one of " + ", ".join(repr(v) for v in HASHGRID_BACKWARDS)),
    ("fused_mlp_precision", "fp16", "one of 'tf32', 'tf32x3', 'ieee'"),
    ("fused_mlp", "yes", "True or False"),
    ("fd_columns", 1, "True or False"),
    ("groupnorm_sums_max_rows", -1, "an integer >= 0"),
    ("groupnorm_sums_max_rows", 2.5, "an integer >= 0"),
    ("groupnorm_sums_max_rows", True, "an integer >= 0"),
])
def test_from_config_refuses_a_bad_value_naming_the_key(key, value, allowed):
    cfg = _kernels_dict()
    cfg[key] = value
    with pytest.raises(KernelConfigError) as info:
        KernelSpec.from_config(cfg)
    assert str(info.value) == f"invalid config value kernels.{key}={value!r}: expected {allowed}"
    assert isinstance(info.value, ValueError)


def test_the_message_is_the_configs_own():
    """config.validate words the same bad value the same way (for the keys it checks itself)."""
    from dreamcraft_jax.config import ConfigError, base_config, validate

    cfg = base_config()
    cfg.kernels.backend = "cuda"
    with pytest.raises(ConfigError) as config_error:
        validate(cfg)
    with pytest.raises(KernelConfigError) as spec_error:
        KernelSpec.from_config(cfg.kernels)
    assert str(spec_error.value) == str(config_error.value)


def test_from_config_refuses_unknown_and_missing_keys():
    cfg = _kernels_dict()
    cfg["fused_everything"] = True
    with pytest.raises(KernelConfigError, match=r"kernels\.fused_everything=True: expected no such key"):
        KernelSpec.from_config(cfg)
    cfg = _kernels_dict()
    del cfg["fd_columns"]
    with pytest.raises(KernelConfigError, match=r"missing config value kernels\.fd_columns"):
        KernelSpec.from_config(cfg)


def test_a_spec_built_directly_is_checked_too():
    with pytest.raises(KernelConfigError, match=r"kernels\.backend='auto'.*from_config resolves"):
        KernelSpec(backend="auto")
    with pytest.raises(KernelConfigError, match=r"kernels\.groupnorm_sums_plan"):
        KernelSpec(groupnorm_sums_plan=(("chunk", 16), ("chunk", 32)))
    # numpy bools (json / array round trips) are bools: the spec stores Python bools, so equal specs hash equal.
    spec = KernelSpec(fused_mlp=np.bool_(True))
    assert spec.fused_mlp is True and spec == KernelSpec(fused_mlp=True)


def _pallas_kernels_traced(fn, *args) -> set[str]:
    """Names of the Pallas kernels in the jaxpr of fn(*args) (tracing only, nothing runs)."""
    return set(re.findall(r"\bname=(\w+)", str(jax.make_jaxpr(fn)(*args)))) & {
        "group_norm_act_fwd", "group_norm_act_bwd", "group_norm_sums_fwd", "group_norm_sums_bwd"}


def test_two_specs_in_one_process_get_their_own_groupnorm_path(monkeypatch):
    """Three specs, interleaved in one process, on a (pretended) GPU backend: the fused-GroupNorm spec traces the
    fused kernel pair only, the sums spec the split-row sums pair only, ``KernelSpec()`` no kernel; the first spec
    traced again after the others is unchanged (no switch left behind); two VAEs with different specs inside one
    function each keep their own; and the values of all three paths agree (the kernels run in interpret mode)."""
    from dreamcraft_jax.guidance.random_priors import TINY_VAE
    from dreamcraft_jax.models import layers
    from dreamcraft_jax.models.vae import AutoencoderKL

    monkeypatch.setattr(layers, "_on_gpu", lambda: True)
    fused = KernelSpec(fused_groupnorm=True)
    sums = KernelSpec(groupnorm_sums_max_rows=1 << 20)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16)) + 1.0
    scale = jax.random.normal(jax.random.PRNGKey(1), (16,))
    bias = jax.random.normal(jax.random.PRNGKey(2), (16,))

    def loss(x, kernels):
        return jnp.sum(jnp.sin(layers.group_norm_act(x, scale, bias, 4, 1e-6, True, kernels)))

    want = {fused: {"group_norm_act_fwd", "group_norm_act_bwd"},
            sums: {"group_norm_sums_fwd", "group_norm_sums_bwd"}, KernelSpec(): set()}
    for kernels in (fused, sums, KernelSpec(), fused):
        assert _pallas_kernels_traced(jax.grad(lambda v, k=kernels: loss(v, k)), x) == want[kernels], kernels
    values = {k: jax.value_and_grad(loss)(x, k) for k in want}
    for k in (fused, sums):
        np.testing.assert_allclose(values[k][0], values[KernelSpec()][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(values[k][1], values[KernelSpec()][1], rtol=1e-4, atol=1e-5)

    # Modules: the spec is a static field of each VAE; one function encoding with both keeps both paths apart.
    vae_fused = AutoencoderKL.from_config(TINY_VAE, kernels=fused)
    vae_ref = vae_fused.clone(kernels=KernelSpec())
    images = jax.random.uniform(jax.random.PRNGKey(3), (1, 16, 16, 3))
    params = vae_ref.init(jax.random.PRNGKey(4), images, method=AutoencoderKL.encode)["params"]

    def encode(vae):
        return lambda im: vae.apply({"params": params}, im, method=AutoencoderKL.encode)[0]

    assert _pallas_kernels_traced(encode(vae_ref), images) == set()
    assert _pallas_kernels_traced(encode(vae_fused), images) == {"group_norm_act_fwd"}
    assert _pallas_kernels_traced(encode(vae_ref), images) == set()
    both = _pallas_kernels_traced(lambda im: (encode(vae_ref)(im), encode(vae_fused)(im)), images)
    assert both == {"group_norm_act_fwd"}
    np.testing.assert_allclose(encode(vae_fused)(images), encode(vae_ref)(images), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ import graph


def _module_files() -> dict[str, Path]:
    """Module name -> file for the package (kernels/ installs as dreamcraft_jax.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "dreamcraft_jax", "dreamcraft_jax"), (ROOT / "kernels", "dreamcraft_jax.kernels")):
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            if prefix == "dreamcraft_jax" and rel[:1] == ("kernels",):
                continue  # no such folder; kernels/ is mapped above
            out[".".join((prefix,) + rel)] = path
    return out


def _import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules its top-level statements import (what runs at import time), each imported
    module's enclosing packages included where they are not the importer's own (their __init__ runs first)."""
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        resolved = set()
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the target and its packages below dreamcraft_jax
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and not (name + ".").startswith(mod + "."):
                    resolved.add(mod)
        edges[name] = resolved
    return edges


def test_kernels_render_and_fields_import_without_a_cycle():
    modules = _module_files()
    edges = _import_edges(modules)
    watched = [m for m in modules if m.startswith(("dreamcraft_jax.kernels", "dreamcraft_jax.render",
                                                   "dreamcraft_jax.fields"))]
    assert "dreamcraft_jax.kernels.march" in watched and "dreamcraft_jax.render.samples" in watched

    def path_back(start):  # depth-first search for a path start -> ... -> start
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(path_back, watched) if c]
    assert not cycles, cycles
    # The kernels see the renderer through render.samples only, and spec.py imports nothing of the package.
    kernel_deps = set().union(*(edges[m] for m in watched if m.startswith("dreamcraft_jax.kernels.")))
    assert not {d for d in kernel_deps if d.startswith("dreamcraft_jax.render.") and d.endswith("volume")}
    assert edges["dreamcraft_jax.kernels.spec"] == set()


@pytest.mark.slow
def test_every_kernel_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(m for m in _module_files() if m.startswith("dreamcraft_jax.kernels."))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for name in names:  # one interpreter each: a cycle shows only when its first module is imported first
        result = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, (name, result.stderr[-2000:])
    no_jax = "import sys, dreamcraft_jax.kernels.spec\nassert 'jax' not in sys.modules, 'spec imported jax'\n"
    result = subprocess.run([sys.executable, "-c", no_jax], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
