"""The suite's GPU visibility: children see none unless a test gives them the original back."""

from __future__ import annotations

import os

import torch

from tests.gpus import ORIGINAL, UNSET, gpu_environment, hide_from_child_processes


def test_children_get_the_original_gpus_back():
    hidden = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "", ORIGINAL: "2,3"}
    assert gpu_environment(hidden) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert hidden[ORIGINAL] == "2,3"  # the caller's dictionary is left as it was


def test_an_originally_unset_variable_is_unset_again():
    assert gpu_environment({"CUDA_VISIBLE_DEVICES": "", ORIGINAL: UNSET}) == {}


def test_nothing_changes_where_nothing_was_hidden():
    assert gpu_environment({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_hiding_reports_this_process_gpus():
    gpus = hide_from_child_processes()  # already done by the suite's conftest: idempotent
    if torch.cuda.is_available():
        assert gpus == torch.cuda.device_count() and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    else:
        assert gpus == 0 and ORIGINAL not in os.environ
