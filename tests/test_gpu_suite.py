"""benchmarks/gpu_suite.sh without a GPU: the shell parses, a dry-run mode of the Python driver
writes the records the summary reads, the summary table and verdict, and the MSDA dispatch
winner. The whole dry run is run by .ci/run after the test suite."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_suite_report  # noqa: E402


def _env(out: Path) -> dict:
    return {**os.environ, "GPU_SUITE_DRY": "1", "TRITON_INTERPRET": "1", "OUT": str(out)}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_suite.sh")], check=True)


def test_dry_mode_records_and_summary(tmp_path):
    driver = [sys.executable, str(BENCH / "gpu_suite.py")]
    subprocess.run(driver + ["--mode", "ceilings"], env=_env(tmp_path), cwd=ROOT, check=True, timeout=120)
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["name"] for r in records] == ["ceilings", "ceilings.headline"]
    assert records[0]["status"] == "ok" and records[0]["dry"] and records[0]["copy_gbs"] > 0
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\tOK\t3\t200\t\nceilings\tOK\t2\t40\t\nsanitize\tSKIP\t0\t-\tno sanitizer\n")
    done = subprocess.run(driver + ["--mode", "report", "--steps", str(steps), "--budget", "470"],
                          env=_env(tmp_path), cwd=ROOT, check=True, capture_output=True, text=True, timeout=60)
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("==== gpu_suite summary (DRY RUN")
    assert lines[2].split()[:3] == ["build", "OK", "3"]
    assert lines[3].split()[:2] == ["ceilings", "OK"] and "GB/s" in lines[3]
    assert "no sanitizer" in lines[4] and lines[-1].startswith("verdict: PASS")
    assert (tmp_path / "summary.txt").read_text().strip() == done.stdout.strip()


def test_summary_marks_failures_and_killed_modes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    (tmp_path / "results.json").write_text(json.dumps({"records": [
        {"mode": "check", "name": "check.decode B5", "status": "ok"},
        {"mode": "check", "name": "check.lora T1", "status": "FAIL", "error": ""},
        {"mode": "kernels", "name": "kernels.msda x", "status": "ok"},
        {"mode": "kernels", "name": "kernels.headline", "status": "info", "headline": "decode 0.9 of copy bw"}]}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("check\tTIMEOUT\t120\t120\t\nkernels\tOK\t50\t150\t\ne2e\tFAIL(1)\t9\t150\t\n")
    assert gpu_suite_report.report(steps, 470) == 0
    out = capsys.readouterr().out.splitlines()
    assert "stopped before its summary" in out[2] and "FAIL check.lora T1" in out[2]
    assert out[3].endswith("decode 0.9 of copy bw")
    assert out[-1].startswith("verdict: FAIL: check, e2e")


def test_msda_dispatch_winner(tmp_path):
    import torch

    import bench_msda

    def row(shape, impl, ms, correct=True):
        return dict(shape=shape, impl=impl, ms=ms, correct=correct)

    rows = [row("enc", "triton", 2.0), row("enc", "cuda", 1.0), row("enc", "classic-cuda", 9.0),
            row("dec", "triton", 0.5), row("dec", "cuda", 0.2, correct=False)]  # "dec" is left out: CUDA failed
    assert bench_msda.fastest_backend(rows) == ("cuda", {"triton": 2.0, "cuda": 1.0})
    winner, path = bench_msda.record_dispatch(rows, torch.bfloat16, "NVIDIA H100", tmp_path / "table.json")
    assert winner == "cuda"
    assert json.loads(path.read_text()) == {"NVIDIA H100": {"ms_deform_attn": {"bfloat16": "cuda"}}}
    assert bench_msda.record_dispatch(rows[:1], torch.bfloat16, "x", tmp_path / "t2.json") == (None, None)
