"""The tiny pipeline on a real Slurm cluster of its own (scripts/test_cluster.sh): `make test-cluster`.

Not part of `make test` (the `cluster` marker is deselected by default): as root it installs and
starts munged, slurmctld and slurmd, which takes minutes.
"""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cluster
@pytest.mark.timeout(1800)
def test_the_tiny_pipeline_on_slurm_equals_the_local_run():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "test_cluster.sh")], cwd=ROOT, timeout=1800)
    assert r.returncode == 0
