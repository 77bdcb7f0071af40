"""Without Slurm and without apt-get, the job-script tests fail with a reason (never skip)."""

from __future__ import annotations

import pytest

from tests.slurm import cluster


def test_missing_slurm_and_apt_get_is_an_error_that_says_so(monkeypatch):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(cluster, "Path", lambda *parts: _Missing())
    with pytest.raises(cluster.ClusterError, match="apt-get is unavailable"):
        cluster.ensure_installed()


class _Missing:
    def exists(self) -> bool:
        return False
