"""Where the device time of a jitted call goes: a per-op table from a JAX profiler trace.

    table = op_profile(compiled_fn, *args, repeats=3)
    print_op_profile(table)

The trace is read back with ``jax.profiler.ProfileData`` (no TensorBoard needed). On a GPU the events are the
kernels on the device plane, keyed by the HLO op they belong to (the ``hlo_op`` stat; the kernel name when it is
missing); on CPU the host thread-pool events that carry an ``hlo_op`` stat. Device-busy time is the union of the
kernel intervals, so ``wall_ms - busy_ms`` is time the device sat idle (launch gaps, host work).
"""

from __future__ import annotations

import glob
import re
import tempfile
import time

import jax

_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "XLA TraceMe", "Framework")


def _stat(event, name: str):
    for key, value in event.stats:
        if key == name:
            return value
    return None


def _kernel_events(profile) -> list[tuple[str, str, int, int]]:
    """(op, kernel, start_ns, duration_ns) of every device kernel (GPU/TPU planes) or, with no device plane,
    of every host event tagged with an HLO op (CPU backend)."""
    device, host = [], []
    for plane in profile.planes:
        on_device = plane.name.startswith("/device:") and "CPU" not in plane.name
        for line in plane.lines:
            if on_device and any(line.name.startswith(d) for d in _DERIVED_LINES):
                continue  # summaries of the same kernels: counting them would double the time
            for event in line.events:
                op = _stat(event, "hlo_op")
                if on_device:
                    device.append((str(op or event.name), event.name, int(event.start_ns), int(event.duration_ns)))
                elif op is not None:
                    host.append((str(op), event.name, int(event.start_ns), int(event.duration_ns)))
    return device or host


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", re.M)
_FIELD = re.compile(r'(\w+)=(?:"([^"]*)"|(\S+))')
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_OWN_CODE = ("dreamcraft_jax", "kernels")


def _stack_tables(hlo_text: str):
    """FileNames / FunctionNames / FileLocations / StackFrames tables of optimized HLO text, as dicts."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            current = None
        elif current is not None and (row := _TABLE_ROW.match(line)):
            value = row[2]
            current[int(row[1])] = value.strip('"') if value.startswith('"') else {
                k: int(v) for k, _, v in _FIELD.findall(value.strip("{}"))}
    return tables


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: "file.py:line tail/of/op_name"} from optimized HLO text (``compiled.as_text()``).

    The location is the innermost frame of this project's code on the op's stack (the innermost frame at all
    when none is ours), read from the stack-frame tables XLA appends to the text.
    """
    tables = _stack_tables(hlo_text)
    files, locations, frames = (tables.get(k, {}) for k in ("FileNames", "FileLocations", "StackFrames"))

    def where(frame_id: int) -> str:
        first, seen = "", set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc = locations.get(frames[frame_id].get("file_location_id"), {})
            path = files.get(loc.get("file_name_id"), "")
            text = f"{path.rsplit('/', 1)[-1]}:{loc.get('line', '?')}"
            if any(part in path for part in _OWN_CODE):
                return text
            first = first or text
            frame_id = frames[frame_id].get("parent_frame_id")
        return first

    out = {}
    for name, metadata in _INSTRUCTION.findall(hlo_text):
        fields = {k: q or v for k, q, v in _FIELD.findall(metadata)}
        loc = where(int(fields["stack_frame_id"])) if "stack_frame_id" in fields else ""
        if not loc and "source_file" in fields:
            loc = f"{fields['source_file'].rsplit('/', 1)[-1]}:{fields.get('source_line', '?')}"
        out[name] = f"{loc} " + "/".join(fields.get("op_name", "").split("/")[-4:])
    return out


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: its full JAX op_name} from optimized HLO text (``compiled.as_text()``)."""
    out = {}
    for name, metadata in _INSTRUCTION.findall(hlo_text):
        fields = {k: q or v for k, q, v in _FIELD.findall(metadata)}
        out[name] = fields.get("op_name", "")
    return out


# A Flax module applied under autodiff shows in the op_name as "jvp(UNet2DConditionModel)" or
# "jvp(AutoencoderKL.encode)", its backward as "transpose(jvp(...))"; the outermost one names the part.
_MODULE = re.compile(r"(transpose\()?jvp\(([A-Z][A-Za-z0-9]*(?:\.\w+)?)\)")


def module_of(op_name: str) -> str:
    """The outermost Flax module an op belongs to, e.g. "AutoencoderKL.encode" or "AutoencoderKL.encode
    (backward)", from its op_name; "(other)" when it is in none."""
    match = _MODULE.search(op_name)
    if match is None:
        return "(other)"
    return match[2] + (" (backward)" if match[1] else "")


def op_profile(fn, *args, repeats: int = 3, top: int = 30, hlo_text: str | None = None) -> dict:
    """Run ``fn(*args)`` ``repeats`` times under the profiler (after one warm-up call) and aggregate its kernels.

    Returns {wall_ms, busy_ms, kernel_ms, kernels, ops: [{op, ms, calls, share, kernel, source}, ...] (top
    ``top`` by time, per call of ``fn``), by_source_line: [{line, ms, share}, ...] (time summed per file:line of
    this project's code), by_module: [{module, ms, share}, ...] (per outermost Flax module, forward and
    backward apart: :func:`module_of`)}. ``kernel_ms`` sums kernel durations (streams may overlap), ``busy_ms``
    is their union, both per call. ``source`` is the tail of the JAX op_name of the HLO op, found in
    ``hlo_text`` (default: ``fn.as_text()`` when ``fn`` is a compiled function).
    """
    if hlo_text is None and hasattr(fn, "as_text"):
        hlo_text = fn.as_text()
    sources = hlo_sources(hlo_text) if hlo_text else {}
    op_names = hlo_op_names(hlo_text) if hlo_text else {}
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn(*args))
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        files = sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))
        if not files:
            raise RuntimeError("the profiler wrote no trace (is another trace running?)")
        events = _kernel_events(ProfileData.from_file(files[-1]))
    by_op: dict[str, list] = {}
    for op, kernel, _, dur in events:
        entry = by_op.setdefault(op, [0, 0, kernel])
        entry[0] += dur
        entry[1] += 1
    kernel_ns = sum(e[3] for e in events)
    busy_ns = _union_ns([(s, s + d) for _, _, s, d in events])
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    by_line: dict[str, int] = {}
    by_module: dict[str, int] = {}
    for op, (ns, _, _) in by_op.items():
        line = sources.get(op, "").split(" ", 1)[0] or "(no source)"
        by_line[line] = by_line.get(line, 0) + ns
        module = module_of(op_names.get(op, ""))
        by_module[module] = by_module.get(module, 0) + ns
    return {
        "wall_ms": 1e3 * wall / repeats,
        "busy_ms": 1e-6 * busy_ns / repeats,
        "kernel_ms": 1e-6 * kernel_ns / repeats,
        "kernels": len(events) // repeats,
        "ops": [{"op": op, "ms": 1e-6 * ns / repeats, "calls": calls // repeats,
                 "share": ns / max(kernel_ns, 1), "kernel": kernel[:120],
                 "source": sources.get(op, "")} for op, (ns, calls, kernel) in ops],
        "by_source_line": [{"line": line, "ms": 1e-6 * ns / repeats, "share": ns / max(kernel_ns, 1)}
                           for line, ns in sorted(by_line.items(), key=lambda kv: -kv[1])[:top]],
        "by_module": [{"module": module, "ms": 1e-6 * ns / repeats, "share": ns / max(kernel_ns, 1)}
                      for module, ns in sorted(by_module.items(), key=lambda kv: -kv[1])],
    }


def print_op_profile(name: str, table: dict, top: int = 20) -> None:
    print(f"{name}: wall {table['wall_ms']:.2f} ms, device busy {table['busy_ms']:.2f} ms, kernel sum "
          f"{table['kernel_ms']:.2f} ms over {table['kernels']} kernels per call")
    print("  by source line: " + ", ".join(f"{r['line']} {r['ms']:.2f} ms" for r in table["by_source_line"][:8]))
    if table.get("by_module"):
        print("  by module: " + ", ".join(f"{r['module']} {r['ms']:.2f} ms" for r in table["by_module"][:8]))
    for row in table["ops"][:top]:
        print(f"  {row['ms']:8.3f} ms {100 * row['share']:5.1f}% x{row['calls']:<4d} {row['op'][:32]:<32} "
              f"{row.get('source', '')[:90]}")
