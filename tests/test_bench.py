"""The bench CLI runs end to end on CPU (tiny sizes) and writes the JSON the README tables are made from."""

import json

import pytest

from dreamcraft_jax.bench import cli, fd, harness, hashgrid, render
from dreamcraft_jax.bench import compile as compile_bench
from dreamcraft_jax.config_file import ROOT


def test_timing_pipelined_is_the_median_of_its_rounds(monkeypatch):
    """Each pipelined round issues ``repeats`` calls with one wait; the reported time is the median round, once
    with each result replacing the last (a training loop) and once with all results kept alive."""
    clock = iter([0.0, 0.001, 0.001, 0.002,  # two latency calls, 1 ms each
                  1.0, 1.030, 2.0, 2.010, 3.0, 3.020,  # three rounds of 2 calls: 30, 10, 20 ms
                  4.0, 4.008, 5.0, 5.004, 6.0, 6.006])  # held: 8, 4, 6 ms
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    calls = []
    out = harness.time_calls(lambda: calls.append(1) or len(calls), repeats=2, warmup=1, pipelined=True, rounds=3)
    assert len(calls) == 1 + 2 + 2 * 3 * 2
    assert out["median_ms"] == pytest.approx(1.0) and out["n"] == 2
    assert out["pipelined_rounds_ms"] == pytest.approx([15.0, 5.0, 10.0])
    assert out["pipelined_ms"] == pytest.approx(10.0)
    assert out["pipelined_held_rounds_ms"] == pytest.approx([4.0, 2.0, 3.0])
    assert out["pipelined_held_ms"] == pytest.approx(3.0)


def test_bench_xla_flags_are_checked_before_anything_runs():
    with pytest.raises(SystemExit, match="--xla_flags: 'nope' is not an XLA flag"):
        cli.main(["--xla_flags", "nope", "sds", "--tiny", "--views", "1"])


@pytest.mark.slow
def test_render_bench_writes_json(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "render.json"
    # The initial scene (fit_steps 0: fit_scene's 128 px step is a program of its own; bench eval fits).
    assert cli.main(["render", "--config", "configs/demo.py", "--resolution", "16", "--fit_steps", "0",
                     "--repeats", "1", "--out", str(out), "--variants", "xla rgb", "pallas rgb"]) == 0
    report = json.loads(out.read_text())
    r = report["results"]
    assert report["resolution"] == 16 and report["fit"]["steps"] == 0 and report["fit"]["grid_occupancy"] > 0
    for variant in ("xla rgb", "pallas rgb"):
        assert r[variant]["forward_backward"]["n"] == 1  # timed with the --repeats asked for
        # Field samples are a subset of the occupied candidates.
        assert 0 < r[variant]["field_samples_per_ray"] <= r[variant]["candidates_per_ray"]
    # The Pallas kernels (interpret mode on CPU) render the fitted scene like the XLA path.
    for variant in ("pallas rgb",):  # the kernels with normals and the fused MLP: tests/test_kernels_*.py
        assert r[variant]["max_abs_image_diff_vs_xla"] <= 1e-3
        assert r[variant]["field_samples_per_ray"] == r["xla rgb"]["field_samples_per_ray"]
    split = r["split_rgb_variant"]
    assert split["valid_samples"] <= split["packed_slots"] <= split["candidate_slots"]


@pytest.mark.slow
def test_render_bench_float64_reference_runs_the_mlps_in_float64(tmp_path, monkeypatch):
    """--f64_reference: every MLP of the reference render sees float64 weights (a float32 reference would run
    them in TF32 on a GPU, like the path it judges), and XLA's float32 path on this CPU (no TF32) lands within
    float32 accumulation error of it."""
    from dreamcraft_jax.fields import nerf

    monkeypatch.chdir(ROOT)
    weight_dtypes = set()

    def recording_apply_mlp(module, net, enc, _apply=nerf.apply_mlp):
        weight_dtypes.add(str(net["layers_0"]["kernel"].dtype))
        return _apply(module, net, enc)

    monkeypatch.setattr(nerf, "apply_mlp", recording_apply_mlp)
    out = tmp_path / "render.json"
    assert cli.main(["render", "--config", "configs/demo.py", "--resolution", "16", "--fit_steps", "0",
                     "--repeats", "1", "--out", str(out), "--variants", "xla rgb+normals", "--f64_reference"]) == 0
    r = json.loads(out.read_text())["results"]
    assert weight_dtypes == {"float32", "float64"}  # the timed float32 variant, then the reference
    assert r["f64 rgb+normals"]["max_abs_image_diff_vs_xla"] < 1e-5
    assert 0 < r["xla rgb+normals"]["table_grad_rel_err_vs_f64"] < 1e-3


def test_sds_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "sds.json"
    assert cli.main(["sds", "--tiny", "--kinds", "zero123", "--views", "2", "--repeats", "1",
                     "--compare_groupnorm", "--groupnorm_sums_max_rows", "4096", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    case = results["zero123_views2"]
    assert case["views"] == 2
    # the A/Bs of kernels.fused_groupnorm and kernels.groupnorm_sums_max_rows (no effect on this CPU backend;
    # each case builds its models with its own KernelSpec)
    assert not case["groupnorm_kernel"] and results["zero123_views2_groupnorm_kernel"]["groupnorm_kernel"]
    assert case["groupnorm_sums_max_rows"] == 4096
    assert results["zero123_views2_groupnorm_sums0"]["groupnorm_sums_max_rows"] == 0
    assert set(results) == {"zero123_views2", "zero123_views2_groupnorm_kernel", "zero123_views2_groupnorm_sums0",
                            "zero123_views2_groupnorm_kernel_groupnorm_sums0"}
    assert abs(case["views_per_s"] - 2 / (case["median_ms"] * 1e-3)) < 1e-6 * case["views_per_s"]


@pytest.mark.slow
def test_sds_bench_compiler_option_variants(tmp_path, capsys):
    """--compiler_options: each case compiled once per option set (XLA parses the values: a GPU option is
    accepted, and ignored, on this CPU), named by its index; a malformed set is one clear error."""
    out = tmp_path / "sds.json"
    options = "xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,CONVOLUTION;xla_gpu_graph_min_graph_size=1"
    assert cli.main(["sds", "--tiny", "--kinds", "zero123", "--views", "1", "--repeats", "1", "--compiler_options",
                     "", options, "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"zero123_views1", "zero123_views1_options1"}
    assert results["zero123_views1"]["compiler_options"] == {}
    assert results["zero123_views1_options1"]["compiler_options"] == {
        "xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL,CONVOLUTION", "xla_gpu_graph_min_graph_size": "1"}
    # The same step on the same inputs: the image gradients agree across variants (what a GPU A/B checks too).
    a, b = results["zero123_views1"], results["zero123_views1_options1"]
    assert a["image_grad_l2"] > 0 and a["image_grad_l2"] == pytest.approx(b["image_grad_l2"], rel=1e-6)
    assert a["image_grad_sum"] == pytest.approx(b["image_grad_sum"], rel=1e-5, abs=1e-7 * a["image_grad_l2"])
    with pytest.raises(SystemExit, match="expected key=value"):
        cli.main(["sds", "--tiny", "--kinds", "zero123", "--views", "1", "--compiler_options", "nonsense"])


def test_gn_sums_bench_writes_json_and_checks_plans(tmp_path):
    """bench gn_sums on the CPU (kernels in interpret mode): each plan's sums equal XLA's; a bad plan is one clear
    error."""
    out = tmp_path / "gn.json"
    assert cli.main(["gn_sums", "--shapes", "2x8x8x96", "--plans", "auto", "c32w4", "c16w8f", "--repeats", "1",
                     "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"2x8x8x96 xla", "2x8x8x96 auto", "2x8x8x96 c32w4", "2x8x8x96 c16w8f"}
    folded = results["2x8x8x96 c16w8f"]
    assert folded["plan"]["fold"] and folded["plan"]["chunk"] == 16 and folded["plan"]["num_warps"] == 8
    auto = results["2x8x8x96 auto"]["plan"]  # what channel_sums.plan picks for 64 rows
    assert not auto["fold"] and (auto["chunk"], auto["num_warps"]) == (32, 4)
    assert all(r["max_rel_diff_vs_xla"] < 1e-5 and "gn_fwd_bwd_ms" in r for r in results.values())
    nbytes = 2 * 8 * 8 * 96 * 4  # the float32 activation read (CPU: float32); the backward reads it and dy
    for r in results.values():
        assert r["fwd_GBps"] == pytest.approx(nbytes / (r["fwd_ms"] * 1e-3) / 1e9, rel=1e-12)
        assert r["bwd_GBps"] == pytest.approx(2 * nbytes / (r["bwd_ms"] * 1e-3) / 1e9, rel=1e-12)
    with pytest.raises(SystemExit, match="bad plan 'c32x4'"):
        cli.main(["gn_sums", "--shapes", "2x8x8x96", "--plans", "c32x4"])


@pytest.mark.slow
def test_stage_bench_tiny_writes_json(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "stage.json"
    # One device and the NeRF stage only (the NeuS step and 8-device steps are tested in test_stage1.py), from
    # the initial scene (fit_steps 0: the 128 px fit would compile a program of its own).
    assert cli.main(["stage", "--config", "configs/demo.py", "--tiny", "--data", "1", "--nerf_resolutions", "16",
                     "--neus_resolutions", "--views", "1", "--fit_steps", "0", "--repeats", "1", "--no_split",
                     "--set", "eval.height=16", "--set", "eval.width=16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    case = report["results"]["coarse_nerf_16px_views1"]
    split = case["random_step"]  # --no_split: the whole step (the split: tests/test_runner.py)
    assert set(split) == {"kind", "height", "width", "step_ms"}  # --no_split: no render / guidance / update
    assert (split["kind"], split["height"], split["width"]) == ("random", 16, 16)
    assert case["views_per_step"] == 1
    assert case["random_views_per_s"] == pytest.approx(1 / (split["step_ms"] * 1e-3), rel=1e-9)
    assert {"ref_step_ms", "alternating_pipelined_ms_per_step", "eval_view_ms"} <= set(case)
    assert set(case["first_call_s"]) == {"ref", "random", "eval_view"}
    assert "peak_memory_bytes_so_far" in case  # None on CPU (no device memory stats)
    # The random step's sample use, against the budgets it was compiled with.
    use, budgets = case["sampling"], case["budgets_per_ray"]
    assert 0 < use["random/samples_per_ray"] <= budgets["samples"]
    assert use["random/samples_per_ray"] <= use["random/candidates_per_ray"]
    assert use["random/overflow"] > 0 or use["random/candidates_per_ray"] <= budgets["candidates"]


@pytest.mark.slow
def test_scaling_bench_cpu_simulated_losses_agree(tmp_path, monkeypatch):
    """The scaling bench on CPU-simulated devices: labelled as such, and the same global views give the same
    Zero123 SDS loss on 1 and 2 devices, replicated or FSDP-split (per-view keys)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "scaling.json"
    assert cli.main(["scaling", "--config", "configs/demo.py", "--tiny", "--kinds", "zero123", "--devices", "1", "2",
                     "--views_per_device", "--global_views", "2", "--resolution", "32", "--repeats", "1",
                     "--out", str(out), "--plot", str(tmp_path / "scaling.png")]) == 0
    report = json.loads(out.read_text())
    assert report["cpu_simulated"] and "CPU-SIMULATED" in report["note"]
    r = report["results"]
    strong = [r[f"zero123_strong_{layout}_dev{n}"] for layout in ("replicated", "fsdp") for n in (1, 2)]
    losses = [c["loss"] for c in strong]
    assert all(abs(v - losses[0]) <= 1e-5 * abs(losses[0]) for v in losses)
    assert all(c["views"] == 2 and c["views_per_s"] == pytest.approx(2 / (c["median_ms"] * 1e-3), rel=1e-9)
               for c in strong)
    # FSDP splits the large leaves: a device holds less of the prior than with replication.
    assert r["zero123_strong_fsdp_dev2"]["prior_bytes_per_device"] < r["zero123_strong_replicated_dev2"][
        "prior_bytes_per_device"]
    assert "zero123_strong_replicated_dev2" in report["efficiency"]
    one, two = r["zero123_strong_replicated_dev1"], r["zero123_strong_replicated_dev2"]
    assert abs(report["efficiency_pipelined"]["zero123_strong_replicated_dev2"]
               - one["pipelined_ms"] / two["pipelined_ms"]) < 1e-9
    assert report["efficiency"]["zero123_strong_replicated_dev2"] == pytest.approx(
        one["median_ms"] / two["median_ms"], rel=1e-12)
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:  # the plot is an optional extra: skipped, the JSON written all the same
        assert not (tmp_path / "scaling.png").exists()
    else:
        from PIL import Image

        with Image.open(tmp_path / "scaling.png") as png:  # two panels side by side
            assert png.size[0] > png.size[1] > 300
    # Weak scaling only, one prior layout: exactly the cases asked for.
    assert cli.main(["scaling", "--config", "configs/demo.py", "--tiny", "--kinds", "zero123", "--devices", "2",
                     "--views_per_device", "1", "--global_views", "0", "--layouts", "fsdp", "--resolution", "32",
                     "--repeats", "1", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"zero123_weak_vpd1_fsdp_dev2"}


def test_bench_config_problems_are_one_error_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    """The benches load their config through config_file.load_config: an unknown key, a value of the wrong type,
    a value the config's validation rejects and a missing file each stop the bench with one ``error:`` line
    naming the problem, exit code 2, before any file is read or written."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "never.json"
    for argv, message in [(["project", "unused.json", "--set", "kernels.nope=1"], "unknown config key 'nope'"),
                          (["project", "unused.json", "--set", "kernels.fused_density=maybe"], "fused_density"),
                          (["project", "unused.json", "--set", "kernels.hashgrid_backward=fast"], "hashgrid_backward"),
                          (["render", "--config", "configs/nope.py"], "configs/nope.py"),
                          (["eval", "--config", "configs/demo.py", "--set", "eval.nope=1"], "unknown config key")]:
        assert cli.main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
        assert not out.exists()


@pytest.mark.parametrize("argv", [["--xla_flags", "--xla_gpu_enable_command_buffer="],
                                  ["--xla_flags=--xla_gpu_enable_command_buffer="]])
def test_xla_flags_value_may_start_with_dashes(argv, monkeypatch):
    """``--xla_flags VALUE`` with a VALUE that starts with ``--`` (argparse alone stops with a usage error) and
    ``--xla_flags=VALUE``: the value reaches apply_xla_flags unchanged, and the bench's own arguments after it
    are parsed as the bench's."""
    seen = []

    def record(flags):  # stop right after: nothing of the bench runs
        seen.append(flags)
        raise ValueError("recorded")

    monkeypatch.setattr(cli, "apply_xla_flags", record)
    with pytest.raises(SystemExit, match="--xla_flags: recorded"):
        cli.main([*argv, "sds", "--tiny", "--views", "2"])
    assert seen == ["--xla_gpu_enable_command_buffer="]
    args = cli.build_parser().parse_args(cli.join_dash_values([*argv, "sds", "--tiny", "--views", "2"]))
    assert (args.xla_flags, args.what, args.tiny, args.views) == ("--xla_gpu_enable_command_buffer=", "sds", True, [2])
    # Several flags in one value, an empty value, and the bench's own "--" values left alone.
    assert cli.join_dash_values(["--xla_flags", "--a=1 --b=2", "compile", "--variants", "x=--c=0"]) == [
        "--xla_flags=--a=1 --b=2", "compile", "--variants", "x=--c=0"]
    assert cli.build_parser().parse_args(cli.join_dash_values(["--xla_flags", "", "sds"])).xla_flags == ""


def _scaling_report(cpu_simulated=True) -> dict:
    """A scaling report as `bench scaling` writes it: strong scaling over 1, 2, 4 devices (speedups 1.8, 3.0)
    and weak scaling over 1, 2 devices (efficiency 0.9)."""
    results, efficiency = {}, {}
    for mode, times in (("strong", {1: 90.0, 2: 50.0, 4: 30.0}), ("weak_vpd1", {1: 10.0, 2: 100.0 / 9.0})):
        for n, ms in times.items():
            name = f"zero123_{mode}_replicated_dev{n}"
            views = 4 if mode == "strong" else n
            results[name] = {"median_ms": ms, "pipelined_ms": ms, "views_per_s": views / (ms * 1e-3), "loss": 1.0,
                             "loss_rel_diff_vs_first": 0.0, "prior_bytes_per_device": 2 ** 20, "devices": n,
                             "views": views, "mode": mode.split("_")[0], "layout": "replicated", "kind": "zero123"}
    from dreamcraft_jax.bench.scaling import scaling_efficiency

    efficiency = scaling_efficiency(results)
    return {"benchmark": "scaling", "platform": "cpu", "device": "cpu", "cpu_simulated": cpu_simulated,
            "note": "", "jax": "x", "tiny": True, "resolution": 32, "results": results, "efficiency": efficiency,
            "efficiency_pipelined": efficiency}


def test_scaling_efficiency_and_plot_series_from_the_times():
    from dreamcraft_jax.bench import report

    rep = _scaling_report()
    eff = rep["efficiency"]
    assert eff["zero123_strong_replicated_dev2"] == pytest.approx(90.0 / 50.0)
    assert eff["zero123_strong_replicated_dev4"] == pytest.approx(90.0 / 30.0)
    assert eff["zero123_weak_vpd1_replicated_dev2"] == pytest.approx(10.0 / (100.0 / 9.0) * 2 / (2 * 1))
    series = report.scaling_series(rep)
    assert series == {"zero123_strong_replicated": [(1, 1.0), (2, pytest.approx(1.8)), (4, pytest.approx(3.0))],
                      "zero123_weak_vpd1_replicated": [(1, 1.0), (2, pytest.approx(0.9))]}


def test_scaling_plot_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from dreamcraft_jax.bench import report

    path = tmp_path / "plots" / "scaling.png"
    assert report.plot_scaling(_scaling_report(), str(path)) is True
    with Image.open(path) as png:  # two panels side by side
        assert png.format == "PNG" and png.size[0] > png.size[1] > 300
    assert "skipped" not in capsys.readouterr().out


def test_scaling_plot_is_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    """No matplotlib: `bench scaling --plot` still writes its JSON and prints one line saying the plot was
    skipped and how to get it (the bench's measurement is replaced by a canned report here)."""
    import builtins

    from dreamcraft_jax.bench import scaling

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    canned = _scaling_report()
    monkeypatch.setattr(scaling, "measure", lambda args: canned)
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    assert cli.main(["scaling", "--plot", str(png), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == canned and not png.exists()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "matplotlib" in ln or str(png) in ln]
    assert len(lines) == 1 and lines[0].startswith("plot skipped") and str(png) in lines[0]
    assert "pip install 'dreamcraft-jax[plots]'" in lines[0] and "pip install matplotlib" in lines[0]


def test_bench_modules_import_no_private_names_and_form_no_cycle():
    """Across the bench package's modules only public names are imported or used, and the module-level imports
    among them form no cycle (each module can be imported on its own)."""
    import ast
    import importlib
    from pathlib import Path

    folder = ROOT / "dreamcraft_jax" / "bench"
    names = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        aliases, deps = {}, set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreamcraft_jax.bench"):
                sub = node.module.removeprefix("dreamcraft_jax.bench").lstrip(".")
                for a in node.names:
                    assert not a.name.startswith("_"), f"{path.name} imports {node.module}.{a.name}"
                    if not sub:  # a module of the package, by name
                        aliases[a.asname or a.name] = a.name
                    if node.col_offset == 0:  # module level
                        deps.add(sub or a.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                  and aliases[node.value.id] != path.stem):
                assert not node.attr.startswith("_"), f"{path.name} uses {node.value.id}.{node.attr}"
        graph[path.stem] = deps - {path.stem}

    state = {}

    def visit(name, trail):
        assert state.get(name) != "open", f"import cycle: {' -> '.join([*trail, name])}"
        if state.get(name) is None:
            state[name] = "open"
            for dep in graph.get(name, ()):
                visit(dep, [*trail, name])
            state[name] = "done"

    for name in graph:
        visit(name, [])
    assert not (ROOT / "dreamcraft_jax" / "bench.py").exists() and not Path(
        ROOT / "dreamcraft_jax" / "bench_compile.py").exists()
    for name in sorted(names - {"__main__"}):
        importlib.import_module(f"dreamcraft_jax.bench.{name}" if name != "__init__" else "dreamcraft_jax.bench")
    assert set(cli.BENCHES) == {"render", "sds", "stage", "eval", "hashgrid", "gn_sums", "fd", "project", "scaling",
                                "profile", "compile", "raster", "geometry"}
    for module in cli.BENCHES.values():
        assert callable(module.add_parser) and callable(module.run) and module.__doc__


def test_f64_reference_encoding_keeps_the_forward_and_accumulates_in_float64():
    """The --f64_reference encoder: features equal to the float32 encoder's to rounding, its table gradient equal
    to a float64 scatter-add of the same cotangent (float32 XLA differs from it by rounding only)."""
    import inspect

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dreamcraft_jax.fields import hashgrid, nerf

    spec = hashgrid.HashGridSpec(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                                 per_level_scale=2.0)
    key_t, key_x, key_g = jax.random.split(jax.random.PRNGKey(0), 3)
    table = hashgrid.init_hashgrid(key_t, spec) * 1e3
    x = jax.random.uniform(key_x, (4096, 3))
    cot = jax.random.normal(key_g, (4096, spec.output_dim))
    with jax.enable_x64(True):
        def f64_loss(t):
            # every keyword the fields pass to nerf.encode_points (the patch replaces it in the real render)
            options = {name: (p.default if p.default is not p.empty else False)
                       for name, p in inspect.signature(nerf.encode_points).parameters.items()
                       if p.kind == p.KEYWORD_ONLY}
            enc = render.f64_encode_points(t, x, spec, None, **options)
            assert enc.dtype == jnp.float32
            return jnp.sum(enc * cot), enc

        (_, enc64), grad64 = jax.value_and_grad(f64_loss, has_aux=True)(table)
        # the float32 points' weights, in float64: what the float32 path computes, summed exactly
        w_exact = np.asarray(jax.grad(lambda t: jnp.sum(hashgrid.encode(t, x, spec) * cot.astype(jnp.float64)))(
            table.astype(jnp.float64)))
        exact = np.asarray(jax.grad(lambda t: jnp.sum(hashgrid.encode(t, x.astype(jnp.float64), spec)
                                                      * cot.astype(jnp.float64)))(table.astype(jnp.float64)))
    # Positions in float32 move the weights of the finest level (scale 32 here) by float32 ulps only.
    np.testing.assert_allclose(w_exact, exact, atol=1e-5 * float(np.max(np.abs(exact))))
    exact = w_exact
    enc32 = hashgrid.encode(table, x, spec)
    np.testing.assert_allclose(np.asarray(enc64), np.asarray(enc32), rtol=1e-5, atol=1e-3)
    scale = float(np.max(np.abs(exact)))
    assert grad64.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grad64, np.float64), exact, atol=1e-6 * scale)
    grad32 = np.asarray(jax.grad(lambda t: jnp.sum(hashgrid.encode(t, x, spec) * cot))(table), np.float64)
    assert float(np.max(np.abs(grad32 - exact))) / scale < 1e-4


def test_project_merges_stage_runs_and_reports_what_is_missing(tmp_path, monkeypatch, capsys):
    """`bench project`: the official schedule (NeRF 128 px for 3000 steps, 384 px for 2000, NeuS 256 px for
    5000; half reference, half random-view steps) over cases from two files, the later file winning."""
    import pytest

    monkeypatch.chdir(ROOT)

    def case(random_ms, ref_ms):
        return {"random_step": {"step_ms": random_ms}, "ref_step_ms": ref_ms}

    first = {"benchmark": "stage", "device": "GPU", "results": {
        "coarse_nerf_128px_views1": case(40.0, 20.0), "coarse_nerf_384px_views1": case(160.0, 120.0),
        "coarse_neus_256px_views1": case(999.0, 999.0)}}
    # The pipelined time of alternating steps, where a file has it, is the step time the projection uses.
    second = {"benchmark": "stage", "partial": True, "device": "GPU", "results": {  # as a cut-off run leaves it
        "coarse_neus_256px_views1": dict(case(100.0, 80.0), alternating_pipelined_ms_per_step=70.0),
        "coarse_nerf_384px_views4": {"error": "out of memory"}}}
    paths = []
    for i, report in enumerate((first, second)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "projection.json"
    assert cli.main(["project", *map(str, paths), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    expected = (3000 * 30.0 + 2000 * 140.0 + 5000 * 70.0) / 60000.0
    assert abs(report["projection"]["minutes"] - expected) < 1e-9
    assert report["projection"]["eval_renders_not_timed"] == ["coarse_nerf", "coarse_neus"]
    assert report["sources"]["coarse_neus_256px_views1"] == str(paths[1])
    assert report["projection"]["step_ms"]["coarse_neus_256px"]["from"].startswith("pipelined")
    assert report["projection"]["step_ms"]["coarse_nerf_384px"] == {"ms_per_step": 140.0,
                                                                   "from": "mean of the two step latencies"}
    # With evaluation renders timed: 2 validation views every 200 steps + 120 turntable frames per stage.
    second["results"]["coarse_neus_256px_views1"]["eval_view_ms"] = 30.0
    paths[1].write_text(json.dumps(second))
    report = cli.main(["project", *map(str, paths), "--out", str(out)]) == 0 and json.loads(out.read_text())
    eval_min = 30.0 * (2 * 5000 // 200 + 120) / 60000.0
    assert abs(report["projection"]["parts"]["coarse_neus_eval_renders_170_views_min"] - eval_min) < 1e-9
    assert abs(report["projection"]["minutes"] - expected - eval_min) < 1e-9
    assert report["projection"]["eval_renders_not_timed"] == ["coarse_nerf"]
    assert "minutes_with_first_calls" not in report["projection"]  # no file timed its compilation
    assert len(report["projection"]["first_calls_not_timed"]) == 3 * 2 + 2
    # First calls (compilation) of each phase's two steps and each stage's eval render: added once per run.
    firsts = {"coarse_nerf_128px_views1": {"ref": 10.0, "random": 40.0},
              "coarse_nerf_384px_views1": {"ref": 12.0, "random": 45.0, "eval_view": 5.0},
              "coarse_neus_256px_views1": {"ref": 11.0, "random": 50.0, "eval_view": 6.0}}
    for report_in in (first, second):
        for name, calls in firsts.items():
            if name in report_in["results"]:
                report_in["results"][name]["first_call_s"] = calls
    for path, report_in in zip(paths, (first, second)):
        path.write_text(json.dumps(report_in))
    report = cli.main(["project", *map(str, paths), "--out", str(out)]) == 0 and json.loads(out.read_text())
    assert abs(report["projection"]["first_calls_s"] - 179.0) < 1e-9 and "first_calls_not_timed" not in report[
        "projection"]
    assert abs(report["projection"]["minutes_with_first_calls"] - (expected + eval_min + 179.0 / 60.0)) < 1e-9
    # A `bench eval` file: each stage's eval-view time at the config's budget (32) replaces the stage files'.
    evals = {"benchmark": "eval", "device": "GPU", "results": {
        "coarse_neus_budget32": {"stage": "coarse_neus", "samples_per_ray": 32.0, "ms": 12.0},
        "coarse_neus_budget64": {"stage": "coarse_neus", "samples_per_ray": 64.0, "ms": 99.0}}}
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    report = cli.main(["project", *map(str, paths), str(tmp_path / "eval.json"), "--out", str(out)]) == 0 and \
        json.loads(out.read_text())
    assert abs(report["projection"]["parts"]["coarse_neus_eval_renders_170_views_min"]
               - 12.0 * 170 / 60000.0) < 1e-9
    assert report["sources"]["coarse_neus_eval_view"] == str(tmp_path / "eval.json")
    with pytest.raises(SystemExit, match="lack a case"):
        cli.main(["project", str(paths[1])])
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "render", "results": {}}))
    with pytest.raises(SystemExit, match="neither a `bench stage` nor a `bench eval` result"):
        cli.main(["project", str(tmp_path / "other.json")])


def test_hashgrid_bench_writes_json_and_xla_is_float64_close(tmp_path):
    """`bench hashgrid` (XLA only here; the kernels' agreement is tests/test_kernels_hashgrid.py): both point
    layouts, and XLA's float32 table gradient within rounding of the float64 accumulation."""
    import jax
    import numpy as np

    out = tmp_path / "hashgrid.json"
    assert cli.main(["hashgrid", "--points", "2048", "--no-pallas", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["points"] == 2048 and report["grid"]["log2_hashmap_size"] == 19
    for layout in ("uniform", "rays"):
        r = report["results"][f"{layout} xla"]
        assert r["forward"]["n"] == r["forward_backward"]["n"] == 1  # timed with the --repeats asked for
        # > 0: float32 rounding must show, else the "float64" reference ran in float32 (judging itself)
        assert 0 < r["table_grad_rel_err_vs_f64"] < 1e-5
    pts = hashgrid.clustered_points(jax.random.PRNGKey(0), 640, points_per_ray=64)
    steps = np.linalg.norm(pts[1:64] - pts[:63], axis=-1)
    assert pts.shape == (640, 3)  # (in [0, 1]^3 by the function's own clip: not checked)
    assert float(steps.max()) <= 0.6 / 64 + 1e-6  # consecutive points of a ray are one step apart at most
    # ... and exactly one step where the chord is not clipped to the cube (most of it: 0.6 long from [0.2, 0.8])
    all_steps = np.linalg.norm(np.diff(np.asarray(pts).reshape(10, 64, 3), axis=1), axis=-1)
    assert np.median(all_steps) == pytest.approx(0.6 / 64, rel=1e-4)


@pytest.mark.slow
def test_compile_bench_runs_a_variant_in_a_child_process(tmp_path, monkeypatch):
    """``bench compile``: a variant compiles in a child process that saw its XLA flags and config overrides; the
    first-call split and the step time come back; a malformed case or variant is one clear error."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    out = tmp_path / "compile.json"
    # --xla_flags '': the child sees exactly XLA_FLAGS + the variant's flags (by default the bench adds
    # cfg.xla_flags when the backend has not started yet, which depends on what this worker ran before).
    assert cli.main(["--xla_flags", "", "compile", "--config", "configs/demo.py", "--tiny", "--cases",
                     "coarse_neus_16px_ref",
                     "--variants", "noauto=--xla_gpu_autotune_level=0|kernels.fused_mlp=True", "--repeats", "2",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"noauto"} and "partial" not in report
    for name, flags, sets in (("noauto", "--xla_gpu_autotune_level=0", ["kernels.fused_mlp=True"]),):
        r = report["results"][name]
        assert r["xla_flags_seen"] == f"--xla_force_host_platform_device_count=1 {flags}".strip()
        assert r["overrides_seen"] == sets and r["overrides"] == sets
        case = r["cases"]["coarse_neus_16px_ref"]
        assert case["repeats"] == 2 and "pipelined_ms_per_step" in case
        # the child's trace, compile and first run happen one after the other inside the process the parent timed
        assert case["finite_loss"] and r["process_s"] > case["trace_lower_s"] + case["compile_s"] + case["first_run_s"]
    for bad in ("coarse_nerf_16_random", "coarse_mesh_16px_ref", "coarse_nerf_16px_both"):
        with pytest.raises(SystemExit, match="expected <coarse_nerf"):
            compile_bench.parse_case(bad)
    with pytest.raises(SystemExit, match="expected name=XLA_FLAGS"):
        compile_bench.parse_variant("--xla_gpu_autotune_level=0")
    with pytest.raises(SystemExit, match="not key=value"):
        compile_bench.parse_variant("levels=|kernels.encoder_per_level")


@pytest.mark.slow
def test_fd_bench_packs_ray_samples_as_the_renderer_and_compares_launch_shapes(tmp_path):
    """`bench fd`'s points: the hitting rays' samples on their chords inside the object sphere, ray after ray in a
    valid prefix of the budget, as many as the sphere's pixel coverage gives; and the CLI's launch-shape variants
    agree with the first (same rows and order: bit-equal features)."""
    import jax
    import numpy as np

    x, valid, n_valid = fd.packed_ray_samples(jax.random.PRNGKey(0), 32, 5, 8, object_radius=0.6,
                                                  distance=3.8, fovy_deg=20.0)
    x, valid = np.asarray(x), np.asarray(valid)
    assert x.shape == (8 * 32 * 32, 3) and valid.sum() == n_valid and valid[:n_valid].all()
    assert np.all(np.linalg.norm(x[:n_valid], axis=-1) <= 0.6 + 1e-5) and not x[n_valid:].any()
    # Pixel centres whose ray meets the sphere: |perpendicular distance of the ray to the centre| < r.
    u = (np.arange(32) + 0.5) / 32 * 2 - 1
    half = np.tan(np.deg2rad(10.0))
    px, py = np.meshgrid(u * half, u * half)
    sin_angle = np.sqrt(px ** 2 + py ** 2) / np.sqrt(1 + px ** 2 + py ** 2)
    assert n_valid == 5 * int(np.sum(3.8 * sin_angle < 0.6))
    out = tmp_path / "fd.json"
    assert cli.main(["fd", "--resolution", "4", "--samples_per_hit", "3", "--budget_per_ray", "4",
                     "--block_points", "32", "16", "--num_warps", "4", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    second = report["results"]["rows block16 warps4 prereduce128"]
    assert report["valid_samples"] > 0 and second["max_abs_feature_diff_vs_first"] == 0.0
    first = report["results"]["rows block32 warps4 prereduce128"]
    assert second["table_grad_rel_diff_vs_first"] < 1e-5
    assert second["forward_backward_speedup_vs_first"] == pytest.approx(
        first["forward_backward"]["median_ms"] / second["forward_backward"]["median_ms"], rel=1e-9)
    assert cli.main(["fd", "--resolution", "4", "--samples_per_hit", "3", "--budget_per_ray", "4",
                     "--block_points", "16", "--num_warps", "4", "--layouts", "rows", "columns", "--forward_only",
                     "--repeats", "1", "--out", str(out)]) == 0
    columns = json.loads(out.read_text())["results"]["columns block16 warps4 prereduce128"]
    assert columns["max_abs_feature_diff_vs_first"] < 1e-6 and "forward_backward" not in columns


def test_raster_bench_writes_json_on_a_closed_outward_mesh(tmp_path):
    import numpy as np
    import trimesh

    from dreamcraft_jax.bench import raster as raster_bench

    vertices, faces = raster_bench.bumpy_sphere(2000)
    mesh = trimesh.Trimesh(np.asarray(vertices), np.asarray(faces), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert abs(len(faces) - 2000) < 0.05 * 2000
    out = tmp_path / "raster.json"
    assert cli.main(["raster", "--faces", "300", "--resolution", "32", "--views", "1", "--tet_resolution", "0",
                     "--zbuffers", "xla", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    r = report["results"]["xla 1 view"]
    assert r["overflow"] == 0 and r["forward_backward"]["n"] == 1 and r["forward_backward_ms_per_view"] > 0
    assert report["mesh"]["faces"] == len(raster_bench.bumpy_sphere(300)[1])


@pytest.mark.slow
def test_geometry_bench_projects_the_stage_from_its_cycle(tmp_path, monkeypatch):
    """`bench geometry` on tiny priors: the projection is 5000 x the pipelined cycle time, the mesh is reported;
    a case failing midway (here its second latency timing, the rgb step's) keeps the parts measured before."""
    from dreamcraft_jax.stages import timing

    calls = []
    real = timing.step_latency_ms

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(timing, "step_latency_ms", fail_second)
    out = tmp_path / "geometry.json"
    assert cli.main(["geometry", "--tiny", "--resolution", "16", "--tet_resolutions", "6", "--zbuffers", "xla",
                     "--repeats", "1", "--no_split", "--set", "geometry.max_faces=2000",
                     "--set", "geometry.max_vertices=1000", "--set", "overrides.geometry.eval.height=16",
                     "--set", "overrides.geometry.eval.width=16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    r = report["results"]["tet6_16px_xla_views1"]
    assert r["projection"]["minutes"] == pytest.approx(5000 * r["cycle_pipelined_ms_per_step"] / 60e3)
    assert r["mesh"]["faces"] > 0 and r["mesh"]["mesh_overflow"] == 0 and r["normal_step"]["step_ms"] > 0
    assert r["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED") and "rgb_step_ms" not in r
    assert set(r["first_call_s"]) == {"rgb", "normal"}
