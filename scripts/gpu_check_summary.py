#!/usr/bin/env python3
"""The summary of scripts/gpu_check.sh: reads the stage table and the raw logs
it collected, counts tests and sanitizer findings, picks the bench's headline
rows, and writes gpu_check_summary.md and summary.json into the report folder.
Prints a short table; exits 1 when any stage failed.

Standard library only (it runs on the GPU image's bare python3 as well)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# Outcomes that are not a failure of the code under test.
NOT_FAILURES = {"PASS", "NOT SUPPORTED", "NOT AVAILABLE"}


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def count_junit(path: Path) -> dict | None:
    """Counts of a GoogleTest or pytest JUnit XML file, with skip reasons."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    reasons: Counter[str] = Counter()
    failed_names: list[str] = []
    skipped_names: list[str] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}.{case.get('name', '')}".strip(".")
        if case.get("status") == "notrun":  # a DISABLED_ GoogleTest
            continue
        failures = case.findall("failure")
        errors = case.findall("error")
        skipped = case.findall("skipped")
        if failures:
            counts["failed"] += 1
            failed_names.append(name)
        elif errors:
            counts["errors"] += 1
            failed_names.append(name)
        elif skipped or case.get("result") == "skipped":
            counts["skipped"] += 1
            msg = (skipped[0].get("message") or skipped[0].text or "") if skipped else ""
            reasons[clean_reason(msg)] += 1
            skipped_names.append(f"{name}: {clean_reason(msg)}")
        else:
            counts["passed"] += 1
    counts["skip_reasons"] = dict(reasons.most_common())
    counts["failed_names"] = failed_names[:30]
    counts["skipped_names"] = skipped_names[:30]
    counts["source"] = path.name
    return counts


def clean_reason(msg: str) -> str:
    msg = msg.strip()
    # pytest: "path:line: reason"; GoogleTest: "file:line\nreason" or "Skipped\nreason"
    msg = re.sub(r"^\S+:\d+:\s*", "", msg)
    lines = [l for l in msg.splitlines() if l.strip() and l.strip() != "Skipped"]
    msg = lines[-1].strip() if lines else "(no reason given)"
    msg = re.sub(r"^Skipped:\s*", "", msg)
    return msg[:160]


def count_gtest_log(text: str) -> dict:
    """From GoogleTest's console output, when no XML was written (timeout, crash)."""
    c = {
        "passed": len(re.findall(r"^\[       OK \] .* \(\d+ ms\)$", text, re.M)),
        "failed": len(re.findall(r"^\[  FAILED  \] .* \(\d+ ms\)$", text, re.M)),
        "skipped": len(re.findall(r"^\[  SKIPPED \] .* \(\d+ ms\)$", text, re.M)),
        "errors": 0,
    }
    c["skipped_names"] = re.findall(r"^\[  SKIPPED \] (.*) \(\d+ ms\)$", text, re.M)[:30]
    started = re.findall(r"^\[ RUN      \] (.*)$", text, re.M)
    finished = sum(c[k] for k in ("passed", "failed", "skipped"))
    if len(started) > finished:  # the one running when it ended
        c["errors"] = len(started) - finished
        c["failed_names"] = [f"{started[-1]} (did not finish)"]
    c["source"] = "console log"
    return c


def count_pytest_log(text: str) -> dict:
    """From pytest's final line ("3 passed, 2 skipped in 1.2s"), when no XML."""
    c = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "source": "console log"}
    lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", lines[-1]):
            key = "errors" if what.startswith("error") else what
            c[key] += int(n)
    # -rs: "SKIPPED [N] file:line: reason", grouped by reason (no test names)
    c["skipped_names"] = re.findall(r"^SKIPPED \[\d+\] (.*)$", text, re.M)[:30]
    return c


def parse_stages(path: Path) -> list[dict]:
    stages = []
    for line in read(path).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            stages.append({"stage": parts[0], "status": parts[1], "seconds": int(parts[2] or 0),
                           "note": parts[3] if len(parts) > 3 else ""})
    return stages


def environment(logs: Path) -> dict:
    env = {}
    for line in (read(logs / "environment.txt") + "\n" + read(logs / "torch_info.txt")).splitlines():
        if ": " in line and not line.startswith(" "):
            k, v = line.split(": ", 1)
            env.setdefault(k.strip(), v.strip())
    smi = read(logs / "environment.txt").split("nvidia-smi:", 1)
    if len(smi) == 2 and smi[1].strip() and "absent" not in smi[1][:20]:
        first = smi[1].strip().splitlines()[0]
        parts = [p.strip() for p in first.split(",")]
        if len(parts) >= 2 and "failed" not in first.lower():
            env["gpu_smi"] = parts[0]
            env["driver"] = parts[1]
        else:
            env["nvidia_smi"] = first[:200]
    return env


def bench_rows(report: Path) -> tuple[list[dict], str]:
    try:
        data = json.loads((report / "perf_results.json").read_text())
    except (OSError, ValueError):
        return [], "no perf_results.json"
    rows = data if isinstance(data, list) else data.get("rows") or data.get("results") or []
    if not isinstance(rows, list):
        return [], "perf_results.json: unknown layout"
    head = []
    for r in rows:
        if not isinstance(r, dict) or r.get("impl") != "fused":
            continue
        head.append({
            "op": r.get("op"), "pass": r.get("pass"), "size": r.get("size"), "points": r.get("points"),
            "device": r.get("device"), "dtype": r.get("dtype"), "scale": r.get("scale", False),
            "warm_ms": 1e3 * r["warm_seconds"] if isinstance(r.get("warm_seconds"), (int, float)) else None,
            "mpoints_s": r["points_per_second"] / 1e6 if isinstance(r.get("points_per_second"), (int, float)) else None,
            "peak_mib": r["peak_bytes"] / 2**20 if isinstance(r.get("peak_bytes"), (int, float)) else None,
            "vs_aten": r.get("speedup_vs_aten_composite"),
            "vs_grid_sample": r.get("speedup_vs_grid_sample_trilinear"),
        })
    return head, f"{len(rows)} rows"


def fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["gpu", "dryrun"], required=True)
    ap.add_argument("--stages", type=Path, required=True)
    ap.add_argument("--logs", type=Path, required=True)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--total-seconds", type=int, default=0)
    ap.add_argument("--budget", type=int, default=0)
    a = ap.parse_args()
    logs, report, gpu = a.logs, a.report, a.mode == "gpu"

    stages = parse_stages(a.stages)
    by_name = {s["stage"]: s for s in stages}

    # Test counts, and what they mean for the stage's status.
    for name, xml, log, from_log in (
        ("gtest", "gtest_cuda.xml", "gtest_cuda.log", count_gtest_log),
        ("pytest", "pytest_cuda.xml", "pytest_cuda.log", count_pytest_log),
        ("pytest_cpu", "pytest_cpu.xml", "pytest_cpu.log", count_pytest_log),
    ):
        s = by_name.get(name)
        if not s:
            continue
        counts = count_junit(logs / xml)
        if counts is None:
            counts = from_log(read(logs / log))
        s["counts"] = counts
        if s["status"] == "NOT RUN":
            continue
        total = sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "errors"))
        bad = counts.get("failed", 0) + counts.get("errors", 0)
        problems = []
        if total == 0:
            problems.append("no test case selected")
        if bad:
            problems.append(f"{bad} failed")
        cuda_stage = name != "pytest_cpu"  # (its skips are the CPU suite's own)
        if gpu and cuda_stage and counts.get("skipped", 0):
            # On a GPU every selected case is a CUDA case that must run: a skip
            # means a test was not checked (the dry run expects them all to skip).
            names = counts.get("skipped_names") or []
            problems.append(f"{counts['skipped']} CUDA case(s) skipped on the GPU"
                            + (": " + ", ".join(names[:5]) if names else "")
                            + (" ..." if len(names) > 5 else ""))
        if not gpu and cuda_stage and counts.get("passed", 0):
            s["note"] += f"; {counts['passed']} selected cases ran on the CPU build (not CUDA cases?)"
        if problems and s["status"] == "PASS":
            s["status"] = "FAIL"
        if problems:
            s["note"] = "; ".join(problems) + ("; " + s["note"] if s["note"] else "")

    for tool in ("memcheck", "racecheck", "synccheck"):
        s = by_name.get(tool)
        if s:
            text = read(logs / f"sanitizer_{tool}.log")
            m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
            r = re.findall(r"RACECHECK SUMMARY: .*\((\d+) error", text)
            s["sanitizer_errors"] = int(m[-1]) if m else (int(r[-1]) if r else None)

    bench, bench_note = bench_rows(report)
    env = environment(logs)
    failed = [s["stage"] for s in stages if s["status"] not in NOT_FAILURES]

    # --- the markdown summary
    title = "GPU check" if gpu else "GPU check, CPU dry run"
    md = [f"# {title}: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}", ""]
    md += [
        f"- GPU: {env.get('gpu') or env.get('gpu_smi') or 'none'}"
        + (f", compute capability {env['capability']}" if env.get("capability") else "")
        + (f", {env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else ""),
        f"- driver: {env.get('driver', env.get('nvidia_smi', 'n/a'))}",
        f"- torch: {env.get('torch', 'unknown')}; python: {env.get('python', '?')}",
        f"- nvcc: {env.get('nvcc', '?')}; cmake: {env.get('cmake', '?')}; cpus: {env.get('cpus', '?')}",
        f"- git: {env.get('git', 'unknown')}",
        f"- date: {env.get('date', '?')}; host: {env.get('host', '?')}",
        f"- wall time: {a.total_seconds} s of a {a.budget} s budget",
        "",
        "| stage | status | s | passed | failed | skipped | sanitizer errors | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in stages:
        c = s.get("counts", {})
        md.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            s["stage"], s["status"], s["seconds"],
            c.get("passed", "") if c else "",
            (c.get("failed", 0) + c.get("errors", 0)) if c else "",
            c.get("skipped", "") if c else "",
            "" if s.get("sanitizer_errors") is None else s["sanitizer_errors"],
            s["note"].replace("|", "\\|")[:300]))
    for s in stages:
        c = s.get("counts") or {}
        if c.get("skip_reasons"):
            md += ["", f"{s['stage']} skip reasons ({c.get('source')}):", ""]
            md += [f"- {n} × {r}" for r, n in c["skip_reasons"].items()]
        if c.get("failed_names"):
            md += ["", f"{s['stage']} failures:", ""] + [f"- `{n}`" for n in c["failed_names"]]
        if gpu and c.get("skipped_names"):
            md += ["", f"{s['stage']} skipped on the GPU (each a failure):", ""]
            md += [f"- `{n}`" for n in c["skipped_names"]]
    md += ["", f"## Bench: the fused op ({bench_note}; all rows in perf_summary.md)", ""]
    if not gpu:
        md += ["Dry run: an unoptimised (-O0) CPU build at a tiny size; these times only show "
               "that the bench runs.", ""]
    if bench:
        md += ["| op | pass | device | size | points | warm ms | Mpoints/s | peak MiB | × aten_composite | × grid_sample |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in bench:
            md.append("| {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} |".format(
                r["op"], r["pass"], r["device"], r["size"], " (scale)" if r["scale"] else "", r["points"],
                fmt(r["warm_ms"], ".3f"), fmt(r["mpoints_s"], ".1f"), fmt(r["peak_mib"], ".1f"),
                fmt(r["vs_aten"], ".1f"), fmt(r["vs_grid_sample"], ".2f")))
    profile = report / "grid_gradient_profile.md"
    if gpu and profile.is_file():  # its headline lines; the kernel tables stay in the file
        head = [line for line in profile.read_text().splitlines() if line.startswith("* ")]
        md += ["", "## Grid gradient, atomic and deterministic (grid_gradient_profile.md)", ""] + head
    md += ["", "Files: perf_results.json and perf_summary.md (the bench's report), "
           "grid_gradient_profile.md (the grid gradient's kernels), logs.tar.gz "
           "(environment, configure/build logs, GoogleTest XML and log, pytest XML and log, "
           "compute-sanitizer logs, stages.tsv, CMakeCache.txt), summary.json.", ""]
    (report / "gpu_check_summary.md").write_text("\n".join(md))
    (report / "summary.json").write_text(json.dumps(
        {"mode": a.mode, "ok": not failed, "failed_stages": failed, "total_seconds": a.total_seconds,
         "environment": env, "stages": stages, "bench_fused": bench}, indent=2, default=str) + "\n")

    # --- the short table on stdout
    print()
    print(f"== {title}: {'PASS' if not failed else 'FAIL'} in {a.total_seconds} s ==")
    print(f"{'stage':<12} {'status':<14} {'s':>4}  {'pass':>5} {'fail':>5} {'skip':>5} {'san':>4}  note")
    for s in stages:
        c = s.get("counts") or {}
        print(f"{s['stage']:<12} {s['status']:<14} {s['seconds']:>4}  "
              f"{str(c.get('passed', '')):>5} {str((c.get('failed', 0) + c.get('errors', 0)) if c else ''):>5} "
              f"{str(c.get('skipped', '')):>5} {'' if s.get('sanitizer_errors') is None else s['sanitizer_errors']:>4}  "
              f"{s['note'][:90]}")
    for r in bench:
        print(f"bench {r['op']:<19} {r['pass']:<16} {r['size']:>5}: {fmt(r['warm_ms'], '.3f')} ms, "
              f"{fmt(r['mpoints_s'], '.1f')} Mpt/s, {fmt(r['peak_mib'], '.1f')} MiB, "
              f"{fmt(r['vs_aten'], '.1f')}x aten")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
