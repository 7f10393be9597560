"""scripts/gpu_check.py (``make gpu-check``): without CUDA it says so and exits 0; its CPU mode runs the quickstart
config sharded (configs/strategies/sharded_cpu.yaml, for real in 2 gloo processes) and prints ``ok``;
a failed case is reported with the last line of its error and the next case runs in a new group of processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def run_script(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == "gpu-check: no CUDA device visible (torch.cuda.is_available() is False): nothing checked."


def test_cpu_mode_runs_quickstart_sharded(tmp_path):
    """One case (a process pair costs ~20 s of CPU; DDP runs of every config are in tests/test_ddp_configs.py)."""
    proc = run_script("--accelerator", "cpu", "--devices", "2", "--techniques", "classifier", "--strategies", "sharded", "--precision", "bf16-mixed",
                      "--timeout", "120", "--out", str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr[-3000:]}\n" + "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("group*.log"))
    lines = out.strip().splitlines()
    assert lines[0].startswith("gpu-check: 2 CPU processes (gloo)")
    assert [line.split()[:4] for line in lines[1:-1]] == [["ok", "classifier", "sharded", "bf16-mixed"]]
    assert lines[-1].startswith("gpu-check: 1 ok, 0 failed")
    sharded = (tmp_path / "classifier-sharded-bf16-mixed")
    assert sorted(p.name for p in sharded.glob("status*.txt")) == ["status0.txt", "status1.txt"]  # both ranks of the pair ran it
    assert "sharded_cpu.yaml" in " ".join(gpu_check.case_args("classifier", "sharded", "32-true", "cpu", 2, 60, tmp_path, tmp_path / "x"))


class Done:
    """A finished process (what ``launch`` returns), exit code ``code``."""

    def __init__(self, code: int):
        self.code = code

    def poll(self):
        return self.code

    def kill(self):
        raise AssertionError("a finished process is not killed")

    def wait(self):
        return self.code


def test_a_failed_case_is_reported_and_the_next_runs_in_a_new_group(tmp_path, monkeypatch):
    """Group 1 runs case a (ok) then fails case b on rank 1 (rank 0 times out in the collective); group 2 runs c."""
    plan = [{"name": n, "technique": n, "strategy": "sharded", "precision": "32-true", "dir": str(tmp_path / n)} for n in "abc"]
    for item in plan:
        Path(item["dir"]).mkdir()
    error = f'Traceback (most recent call last):\n{frame(f"{ROOT}/zoo/emoe/surgery.py", 12, "apply")}ValueError: EMoEModule: Moefy cannot train under X\n'
    groups = {0: {"a": ["ok", "ok"], "b": ["Traceback ...\nRuntimeError: [Rank 0] Watchdog caught collective operation timeout\n", error]},
              1: {"c": ["ok", "ok"]}}
    launched = []

    def fake_launch(pending, devices, out, k):
        launched.append([i["name"] for i in pending])
        for name, texts in groups[k].items():
            for r, text in enumerate(texts):
                (tmp_path / name / f"started{r}").write_text("1.0")
                (tmp_path / name / f"status{r}.txt").write_text(text)
        return [Done(0), Done(1)]

    monkeypatch.setattr(gpu_check, "launch", fake_launch)
    lines = []
    results = gpu_check.run_all(plan, 2, 60, tmp_path, lambda item, status, detail, s: lines.append((item["name"], status, detail)))
    assert launched == [["a", "b", "c"], ["c"]]
    assert lines == [("a", "ok", ""), ("b", "FAILED", "ValueError: EMoEModule: Moefy cannot train under X (rank 1, zoo/emoe/surgery.py:12 in apply)"),
                     ("c", "ok", "")]
    assert results["b"][0] == "FAILED" and results["c"] == ("ok", "")


def test_a_group_that_cannot_start_fails_every_case(tmp_path, monkeypatch):
    plan = [{"name": n, "technique": n, "strategy": "ddp", "precision": "32-true", "dir": str(tmp_path / n)} for n in "ab"]
    (tmp_path / "group0_rank0.log").write_text("...\nModuleNotFoundError: No module named 'lightning'\n")
    monkeypatch.setattr(gpu_check, "launch", lambda pending, devices, out, k: [Done(1), Done(1)])
    results = gpu_check.run_all(plan, 2, 60, tmp_path, lambda *a: None)
    assert results == {n: ("FAILED", "processes did not start: ModuleNotFoundError: No module named 'lightning'") for n in "ab"}


def frame(path: str, line: int, fn: str) -> str:
    return f'  File "{path}", line {line}, in {fn}\n'


@pytest.mark.parametrize("texts,expected", [
    (["ok", "T\n" + frame(f"{ROOT}/cli.py", 3, "main") + frame("/usr/lib/site-packages/x.py", 9, "f") + "KeyError: 'x'\n"],
     "KeyError: 'x' (rank 1, cli.py:3 in main)"),
    ([f"T\n{frame(f'{ROOT}/callbacks/stitch_sweep.py', 73, 'stitch_latency')}RuntimeError: Timed out waiting 120000ms for send\n",
      f"T\n{frame(f'{ROOT}/callbacks/stitch_sweep.py', 227, 'on_fit_end')}RuntimeError: Timed out waiting 120000ms for recv\n"],
     "RuntimeError: Timed out waiting 120000ms for send (rank 0 in callbacks/stitch_sweep.py:73 in stitch_latency; "
     "rank 1 in callbacks/stitch_sweep.py:227 in on_fit_end)")], ids=["own error", "both in collectives"])
def test_error_line(texts, expected):
    assert gpu_check.error_line(texts) == expected
