"""The benches' printed tables and the scaling plot, from their JSON reports (nothing is measured here).

Each ``print_*`` takes the report dict a bench's ``run`` returns (the JSON it writes with ``--out``), so a
saved report can be printed again: ``report.print_stage_table(json.load(open("stage.json")))``.
:func:`plot_scaling` needs matplotlib, an optional extra (``pip install dreamcraft-jax[plots]``): without it the
plot is skipped with one line saying so, and the bench still writes its JSON.
"""

from __future__ import annotations

from pathlib import Path

PLOTS_INSTALL_HINT = "pip install 'dreamcraft-jax[plots]' (or: pip install matplotlib)"


def print_table(report: dict) -> None:
    """`bench render`: per variant fwd+bwd / fwd ms, samples and candidates per ray, overflow, agreement with XLA;
    then the split of the rgb variant, if timed."""
    r = report["results"]
    print(f"render fwd+bwd, {report['resolution']}x{report['resolution']}, {report['device']}, jax {report['jax']}")
    print(f"{'variant':<24} {'fwd+bwd ms':>11} {'fwd ms':>8} {'samples/ray':>12} {'cand/ray':>9} {'overflow':>9}")
    for name in [k for k in r if not k.startswith(("split", "f64"))]:
        v = r[name]
        if "error" in v:
            print(f"{name:<24} {v['error']}")
            continue
        extra = (f"  {v['speedup_vs_xla']:.2f}x vs xla, image diff {v['max_abs_image_diff_vs_xla']:.1e}, "
                 f"table grad rel diff {v['table_grad_rel_diff_vs_xla']:.1e}" if "speedup_vs_xla" in v else "")
        if "table_grad_rel_err_vs_f64" in v:
            extra += f", vs float64 {v['table_grad_rel_err_vs_f64']:.1e}"
        print(f"{name:<24} {v['forward_backward']['median_ms']:>11.2f} {v['forward']['median_ms']:>8.2f} "
              f"{v['field_samples_per_ray']:>12.2f} {v['candidates_per_ray']:>9.2f} {v['overflow']:>9d}{extra}")
    if "split_rgb_variant" not in r:
        return
    s = r["split_rgb_variant"]
    print("split (rgb variant, each fwd+bwd on the same packed samples):")
    for k in ("march_occupancy_only", "march_with_density_pruning", "encode_fwd_bwd", "mlp_fwd_bwd",
              "composite_fwd_bwd"):
        print(f"  {k:<28} {s[k]['median_ms']:>9.2f} ms")


def print_sds_table(report: dict) -> None:
    """`bench sds`: latency and pipelined ms per case, views/s, TFLOP/s and fraction of peak, against the PyTorch
    baseline of ``--torch_json`` where given."""
    torch_ref = report.get("torch") or {}
    print(f"SDS step (d loss / d images), {report['device']}, jax {report['jax']}, {report['dtype']}; "
          f"bf16 matmul peak {report['bf16_matmul_peak_tflops'] or float('nan'):.0f} TFLOP/s")
    print("latency: each call waited for; pipelined: calls back to back, one wait (a training loop)")
    print(f"{'case':<28} {'ms':>9} {'views/s':>8} {'TFLOP/s':>8} {'of peak':>8} {'torch ms':>9} {'speedup':>8} "
          f"{'pipelined ms':>13} {'torch pipel.':>13} {'speedup':>8}")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
            continue
        case = name.split("_xla")[0].split("_groupnorm")[0].split("_options")[0]
        base = case.replace("sd_views", "sd_sds_512_views").replace("zero123_views", "zero123_sds_256_views")
        t_ms = torch_ref.get(base + "_ms")
        tf = r.get("tflops_per_s") or float("nan")
        nan = float("nan")
        p_ms, tp_ms = r.get("pipelined_ms"), torch_ref.get(base + "_pipelined_ms")
        c_ms, cp_ms = torch_ref.get(base + "_compiled_ms"), torch_ref.get(base + "_compiled_pipelined_ms")
        compiled = (f"   torch.compile {c_ms:.2f} / {cp_ms:.2f} ms: {c_ms / r['median_ms']:.2f}x / "
                    f"{cp_ms / p_ms:.2f}x" if (c_ms and cp_ms and p_ms) else "")
        print(f"{name:<28} {r['median_ms']:9.2f} {r['views_per_s']:8.1f} {tf:8.1f} "
              f"{r.get('fraction_of_peak', nan):8.2%} {t_ms or nan:9.2f} "
              f"{(t_ms / r['median_ms']) if t_ms else nan:7.2f}x {p_ms or nan:13.2f} {tp_ms or nan:13.2f} "
              f"{(tp_ms / p_ms) if (tp_ms and p_ms) else nan:7.2f}x{compiled}")


def print_stage_table(report: dict) -> None:
    """`bench stage`: per case the random step (and its render / guidance / update split), the reference step,
    the pipelined pair and views/s; then the projected wall time of the official run."""
    print(f"stage steps, {report['device']} x{report['devices']}, jax {report['jax']}, kernels "
          f"{report['kernels_backend']}{' (TINY priors)' if report['tiny'] else ' (real-size random priors)'}")
    print(f"{'case':<28} {'random ms':>10} {'render':>8} {'guide':>8} {'update':>8} {'ref ms':>8} "
          f"{'pair ms':>8} {'views/s':>8}")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
            continue
        s = r["random_step"]
        split = "".join(f" {s[k]:>8.1f}" if k in s else f" {'-':>8}" for k in ("render_ms", "guidance_ms", "update_ms"))
        pair = r.get("alternating_pipelined_ms_per_step")
        print(f"{name:<28} {s['step_ms']:>10.1f}{split} {r['ref_step_ms']:>8.1f} "
              f"{pair if pair is None else round(pair, 1)!s:>8} {r['random_views_per_s']:>8.1f}")
    if report["projection"]:
        proj = report["projection"]
        first = (f" ({proj['minutes_with_first_calls']:.1f} min with the first calls' compilation)"
                 if "minutes_with_first_calls" in proj else "")
        print(f"projected 5000 + 5000 steps: {proj['minutes']:.1f} min{first}")


def print_projection(report: dict) -> None:
    """`bench project`: minutes per phase (with its ms per step and where that comes from), the evaluation
    renders, the total."""
    p = report["projection"]
    steps = list(p["step_ms"].values())
    for i, (part, minutes) in enumerate(p["parts"].items()):
        how = f"   {steps[i]['ms_per_step']:7.1f} ms/step ({steps[i]['from']})" if i < len(steps) else ""
        print(f"{part:<40} {minutes:6.1f} min{how}")
    if p.get("eval_renders_not_timed"):
        print(f"evaluation renders not timed for {', '.join(p['eval_renders_not_timed'])} (older files)")
    print(f"{'total':<40} {p['minutes']:6.1f} min")


def print_scaling_table(report: dict) -> None:
    """`bench scaling`: per case latency and pipelined ms, views/s, efficiency (weak) or speedup (strong) by each
    timing, prior MB per device and the loss against the first case of the same views."""
    print(f"scaling, {report['device']} ({'CPU-SIMULATED devices' if report['cpu_simulated'] else report['platform']})"
          f", jax {report['jax']}{', TINY priors' if report['tiny'] else ''}, {report['resolution']} px")
    print(f"{'case':<42} {'ms':>9} {'pipelined':>9} {'views/s':>9} {'efficiency':>10} {'(pipelined)':>11} "
          f"{'prior MB/dev':>12} {'loss vs first':>13}")
    for name, r in report["results"].items():
        if "median_ms" not in r:
            print(f"{name:<42} {r.get('error') or r.get('skipped')}")
            continue
        eff = report["efficiency"].get(name, float("nan"))
        eff_p = report.get("efficiency_pipelined", {}).get(name, float("nan"))
        print(f"{name:<42} {r['median_ms']:9.1f} {r.get('pipelined_ms', float('nan')):9.1f} {r['views_per_s']:9.2f} "
              f"{eff:10.2f} {eff_p:11.2f} {r['prior_bytes_per_device'] / 2**20:12.2f} "
              f"{r['loss_rel_diff_vs_first']:13.1e}")


def print_compile_table(report: dict) -> None:
    """`bench compile`: per variant and case the trace + lower, compile and first-run seconds and the ms/step."""
    print(f"first-call cost per XLA flag set, {report['device']}, jax {report['jax']}"
          f"{' (TINY priors)' if report['tiny'] else ''}")
    print(f"{'variant':<16} {'case':<28} {'lower s':>8} {'compile s':>10} {'first run s':>12} {'ms/step':>9}")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:<16} {r['error'][:90]}")
            continue
        for case, c in r["cases"].items():
            print(f"{name:<16} {case:<28} {c['trace_lower_s']:>8.1f} {c['compile_s']:>10.1f} "
                  f"{c['first_run_s']:>12.1f} {c['pipelined_ms_per_step']:>9.2f}")


def scaling_series(report: dict) -> dict[str, list[tuple[int, float]]]:
    """``{case without _dev<n>: [(devices, efficiency or speedup), ...]}`` of a scaling report's latency-based
    ``efficiency``, with the 1-device point (1 by definition) where that case ran on 1 device."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name, value in report["efficiency"].items():
        r = report["results"][name]
        series.setdefault(name.rsplit("_dev", 1)[0], []).append((r["devices"], value))
    for name, r in report["results"].items():  # the 1-device points: 1 by definition
        base = name.rsplit("_dev", 1)[0]
        if r.get("devices") == 1 and "median_ms" in r and base in series:
            series[base].append((1, 1.0))
    return {name: sorted(points) for name, points in series.items()}


def plot_scaling(report: dict, path: str) -> bool:
    """PNG at ``path`` with two panels over device count (log2 axis): weak-scaling efficiency (ideal 1) and
    strong-scaling speedup (ideal n), one line per (kind, views per device, layout) of :func:`scaling_series`;
    the title says when the devices are simulated. Returns False, after printing one line saying how to get the
    plot, where matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plot skipped ({path}): matplotlib is not installed; {PLOTS_INSTALL_HINT}")
        return False

    series = scaling_series(report)
    max_dev = max([d for pts in series.values() for d, _ in pts] + [2])
    ticks = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= max_dev]
    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    title = "scaling, " + ("CPU-SIMULATED devices (times do not show scaling)" if report["cpu_simulated"]
                           else report["device"])
    fig.suptitle(title)
    for ax, (mode, label) in zip(fig.subplots(1, 2), (("weak", "weak-scaling efficiency (ideal 1)"),
                                                       ("strong", "strong-scaling speedup (ideal n)"))):
        # Through every tick: on the log2 axis the strong-scaling ideal (n at n) is no straight line.
        ideal = [1.0 if mode == "weak" else float(d) for d in ticks]
        ax.plot(ticks, ideal, color="0.75", linestyle="--", label="ideal")
        top = max(ideal)
        for name, pts in sorted(series.items()):
            if f"_{mode}" not in name:
                continue
            ax.plot([d for d, _ in pts], [v for _, v in pts], marker="o", label=name)
            top = max(top, *(v for _, v in pts))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(d) for d in ticks])
        ax.set_xlim(0.9, max_dev * 1.1)
        ax.set_ylim(0.0, top * 1.15)
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True
