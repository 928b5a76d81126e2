"""Shared benchmark machinery: ratio summary, peak-memory probe, optional RESULTS.md table.

Each benchmark sets ``benchmark.group`` to "<op> / <shape> / <pass>" and
``benchmark.extra_info["variant"]`` (e.g. "reference", "cpu"). A variant can declare a target
against another variant of its group:
``benchmark.extra_info["target"] = {"vs": "reference", "min_speedup": 2.0}``
(speedup = median time of "vs" / median time of this variant) and a memory target
``{"vs": ..., "max_mem_ratio": 0.125}`` compared on ``extra_info["peak_rss_mb"]``.
At the end of the session a table of ratios is printed; ``--results-md FILE`` also writes it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

# the benchmark baselines (benchmarks/baselines.py) are imported as `baselines` by the benchmark files
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--results-md", default=None,
                     help="write the summary table of this benchmark run to this Markdown file")


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU: {torch.cuda.get_device_name(0)}"
    return desc


def peak_rss_increase_mb(setup: str, run: str, threads: int | None = None) -> float:
    """Peak resident-memory increase (MiB) of ``run`` in a fresh Python process, after ``setup`` ran there."""
    # Linux: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM, so the peak
    # of `run` is measured from the resident size just before it, not from import-time peaks.
    code = textwrap.dedent(setup) + "\n" + textwrap.dedent("""
        import gc
        def _status_kb(field):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _before = _status_kb("VmRSS")
        """) + textwrap.dedent(run) + textwrap.dedent("""
        print("PEAK_RSS_KB", _status_kb("VmHWM") - _before)
        """)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.expanduser("~"), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    kb = [line for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KB")][-1].split()[1]
    return int(kb) / 1024.0


@pytest.fixture
def peak_rss():
    return peak_rss_increase_mb


def _summary(benchmarks) -> list[str]:
    groups: dict[str, dict[str, object]] = {}
    for b in benchmarks:
        if not b or b.has_error:
            continue
        groups.setdefault(b.group or "", {})[b.extra_info.get("variant", b.name)] = b
    rows = ["| group | variant | median | vs | speedup | target | peak mem (MiB) | mem ratio | mem target | met |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for group in sorted(groups):
        variants = groups[group]
        for name, b in sorted(variants.items()):
            med = b.stats.median
            mem = b.extra_info.get("peak_rss_mb")
            target = b.extra_info.get("target") or {}
            vs = target.get("vs")
            base = variants.get(vs) if vs else None
            speedup = base.stats.median / med if base is not None else None
            mem_ratio = None
            if base is not None and mem is not None and base.extra_info.get("peak_rss_mb"):
                mem_ratio = mem / base.extra_info["peak_rss_mb"]
            met = []
            if speedup is not None and "min_speedup" in target:
                met.append(speedup >= target["min_speedup"])
            if mem_ratio is not None and "max_mem_ratio" in target:
                met.append(mem_ratio <= target["max_mem_ratio"])
            rows.append("| {} | {} | {:.3f} ms | {} | {} | {} | {} | {} | {} | {} |".format(
                group.replace("|", "/"), name, med * 1e3, vs or "",
                f"{speedup:.2f}x" if speedup is not None else "",
                f">= {target['min_speedup']:.3g}x" if "min_speedup" in target else "",
                f"{mem:.1f}" if mem is not None else "",
                f"{mem_ratio:.3f}" if mem_ratio is not None else "",
                f"<= {target['max_mem_ratio']}" if "max_mem_ratio" in target else "",
                ("yes" if all(met) else "NO") if met else ""))
    return rows


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    rows = _summary(bs.benchmarks)
    text = "\n".join(rows)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        tr.write_line(f"loupe benchmark summary ({machine_name()})")
        for r in rows:
            tr.write_line(r)
    path = session.config.getoption("--results-md")
    if path:
        with open(path, "w") as f:
            f.write(f"# Benchmark results\n\nMachine: {machine_name()}\n\n"
                    f"Command: `pytest benchmarks/ --benchmark-only --results-md {path}`\n\n")
            f.write(text + "\n")
            extra = {b.group: b.extra_info for b in bs.benchmarks if b and b.extra_info.get("note")}
            if extra:
                f.write("\nNotes:\n" + "".join(f"- {g}: {e['note']}\n" for g, e in sorted(extra.items())))
        if tr is not None:
            tr.write_line(f"wrote {path}")
