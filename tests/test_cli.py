"""The `iid` command line as users run it: the installed console script in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

IID = shutil.which("iid", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
def test_demo_trains_evaluates_and_writes_metrics(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [IID, "demo", "--epochs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "k-means on raw pixels" in run.stdout
    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert set(metrics["iid"]) == {"acc", "nmi", "ari"}
    # 10 balanced classes: a matched random clustering scores about 0.11; training must beat it.
    assert metrics["iid"]["acc"] > 0.25
    assert not list(out.glob("*.tmp"))


@pytest.mark.skipif(IID is None, reason="console script `iid` not installed next to this python")
def test_unknown_command_fails_with_usage():
    run = subprocess.run([IID, "nonsense"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "invalid choice" in run.stderr
