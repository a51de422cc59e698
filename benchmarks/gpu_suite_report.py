"""The summary table of benchmarks/gpu_suite.sh (standard library only: it must print even when
torch or the build is broken).

Input: the suite's step table (tab-separated: name, status, seconds, limit, note; status OK,
FAIL(rc), TIMEOUT or SKIP) and the files in $OUT: results.json (driver records; each mode's
`<mode>.headline` record), pytest_cuda.xml, sanitizer.log, build.log. Output: one line per step
(status, seconds, limit, headline numbers) on stdout and in $OUT/summary.txt.
"""
from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

# suite step name -> driver mode whose headline it shows
MODE_OF = {"build": "probe", "check": "check", "ceilings": "ceilings", "kernels": "kernels", "step": "step",
           "sanitize": "sanitize", "e2e": "e2e"}


def _out() -> Path:
    dry = os.environ.get("GPU_SUITE_DRY") == "1"
    return Path(os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "out" /
                ("gpu_suite_dry" if dry else "gpu_suite"))


def read_steps(path: Path | None) -> list[dict]:
    rows = []
    if path and path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t") + [""] * 5
            if parts[0]:
                rows.append({"name": parts[0], "status": parts[1], "secs": parts[2], "limit": parts[3],
                             "note": parts[4]})
    return rows


def headlines(out: Path) -> dict[str, str]:
    try:
        records = json.loads((out / "results.json").read_text())["records"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    heads, seen, bad = {}, {}, {}
    for r in records:
        mode = r.get("mode")
        if r.get("status") == "info" and "headline" in r:
            heads[mode] = r["headline"]
            continue
        seen.setdefault(mode, []).append(r.get("name"))
        if r.get("status") in ("FAIL", "ERROR"):
            bad.setdefault(mode, []).append(f"{r['status']} {r.get('name')}: {str(r.get('error', ''))[:160]}")
    for mode, names in seen.items():  # a mode killed or crashed before its headline still says how far it got
        if mode not in heads:
            heads[mode] = (f"stopped before its summary line: {len(names)} records, last {names[-1]!r}"
                           + (f"; {len(bad[mode])} failing: " + "; ".join(bad[mode][:2]) if mode in bad else ""))
    return heads


def pytest_line(out: Path) -> str:
    try:
        root = ET.parse(out / "pytest_cuda.xml").getroot()
    except (OSError, ET.ParseError):
        return "no junit XML"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "junit XML without a testsuite"
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failed = [f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
            + (f" ({'; '.join(failed[:3])})" if failed else ""))


def sanitizer_line(out: Path) -> str:
    try:
        text = (out / "sanitizer.log").read_text(errors="replace")
    except OSError:
        return ""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return f"memcheck: {m[-1]} errors" if m else "sanitizer.log has no ERROR SUMMARY"


def step_headline(step: dict, out: Path, heads: dict[str, str]) -> str:
    name = step["name"]
    parts = [step["note"]] if step["note"] else []
    if name == "pytest" and step["status"] != "SKIP":
        parts.append(pytest_line(out))
    if name == "sanitize" and step["status"] != "SKIP" and os.environ.get("GPU_SUITE_DRY") != "1":
        parts.append(sanitizer_line(out))
    if name in MODE_OF and MODE_OF[name] in heads:
        parts.append(heads[MODE_OF[name]])
    return "; ".join(p for p in parts if p)


def report(steps_path: Path | None, budget: int = 0) -> int:
    out = _out()
    steps = read_steps(steps_path)
    heads = headlines(out)
    dry = os.environ.get("GPU_SUITE_DRY") == "1"
    total = sum(int(s["secs"]) for s in steps if s["secs"].isdigit())
    bad = [s["name"] for s in steps if s["status"].startswith(("FAIL", "TIMEOUT"))]
    lines = [f"==== gpu_suite summary ({'DRY RUN on the CPU' if dry else 'GPU'}): {len(steps)} steps, "
             f"{total} s of steps, budget {budget or '-'} s, results in {out} ====",
             f"{'step':<15}{'status':<12}{'secs':>5}{'limit':>6}  headline"]
    for s in steps:
        lines.append(f"{s['name']:<15}{s['status']:<12}{s['secs']:>5}{s['limit']:>6}  {step_headline(s, out, heads)}")
    files = sorted({p.name for p in out.iterdir() if p.is_file()} | {"summary.txt"}) if out.is_dir() else []
    lines.append(f"files in $OUT ({len(files)}, at most 8 come back): {' '.join(files)}")
    lines.append(f"verdict: {'FAIL: ' + ', '.join(bad) if bad else 'PASS'} (a step passes when OK or SKIP)")
    text = "\n".join(lines)
    if out.is_dir():
        (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return 0  # the suite's exit status comes from the step table, not from here
