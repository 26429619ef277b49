"""The suite and the benchmarks leave no GBs behind: a trained ResNet50 alone is ~370 MB on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

INNER_TESTS = '''
import pytest


@pytest.fixture(scope="module")
def shared(module_tmp):
    folder = module_tmp("{name}")
    (folder / "checkpoint.pt").write_bytes(b"x" * 1000)
    return folder


def test_it(shared):
    assert {outcome}
'''


def test_module_tmp_folders_go_with_a_passing_module_and_stay_after_a_failure(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text("from tests.conftest import module_tmp  # noqa: F401\n")
    (suite / "test_passing.py").write_text(INNER_TESTS.format(name="passing", outcome=True))
    (suite / "test_failing.py").write_text(INNER_TESTS.format(name="failing", outcome=False))
    base = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite),
                           f"--basetemp={base}", f"--rootdir={suite}"], capture_output=True, text=True,
                          cwd=suite, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert not (base / "passing0").exists()
    assert (base / "failing0" / "checkpoint.pt").exists()  # kept to look at


def test_benchmark_scratch_folder_is_removed_when_the_script_exits(tmp_path):
    code = ("import sys; from benchmarks.bench import scratch_dir; p = scratch_dir('dnf-test-'); "
            "(p / 'data.bin').write_bytes(b'x'); print(p); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 3, proc.stderr
    folder = Path(proc.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("dnf-test-")
    assert not folder.exists()
