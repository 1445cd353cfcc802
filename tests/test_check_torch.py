"""scripts/check_torch.py: what `.ci/run` uses to catch a set-up that swapped its torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "check_torch", Path(__file__).parents[1] / "scripts" / "check_torch.py")
check_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_torch)


def test_the_cpu_build_asked_for_passes():
    assert check_torch.problems("torch==2.13.0", "2.13.0+cpu", None, False, []) == []
    assert check_torch.problems("torch>=2.2", "2.14.1", None, False, []) == []


def test_a_swapped_cuda_build_on_a_cpu_machine_fails_on_every_count():
    found = check_torch.problems("torch==2.13.0", "2.14.1+cu130", "13.0", False,
                                 ["nvidia-cublas", "nvidia-nccl-cu13"])
    assert found == ["torch 2.14.1+cu130 installed, but TORCH_SPEC asks for torch==2.13.0",
                     "torch 2.14.1+cu130 is a CUDA 13.0 build on a machine without a GPU",
                     "2 nvidia-* packages installed on a machine without a GPU "
                     "(nvidia-cublas, nvidia-nccl-cu13, ...)"]


def test_a_cuda_build_is_fine_where_there_is_a_gpu():
    assert check_torch.problems("torch==2.14.1", "2.14.1+cu130", "13.0", True,
                                ["nvidia-cublas"]) == []
