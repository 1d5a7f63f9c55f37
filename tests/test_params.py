import random

import numpy as np
import pytest
import torch

from prefdyn.params import ParameterError, positive, resolve_device, setup

SIZES = {"smoke": {"steps": 1}, "ci": {"steps": 2}, "full": {"steps": 3}}


def test_setup_returns_the_sizes_of_the_scale():
    run = setup("ci", "cpu", 3, SIZES)
    assert run.sizes == {"steps": 2} and run.device == torch.device("cpu") and run.seed == 3


@pytest.mark.parametrize("scale", ["huge", "CI", "", None])
def test_unknown_scale_names_the_choices(scale):
    with pytest.raises(ParameterError, match="smoke, ci, full"):
        setup(scale, "cpu", 0, SIZES)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed(seed):
    with pytest.raises(ParameterError, match="seed"):
        setup("ci", "cpu", seed, SIZES)


def test_negative_size_is_rejected():
    with pytest.raises(ParameterError, match="steps=-5"):
        setup("ci", "cpu", 0, {**SIZES, "ci": {"steps": -5}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_says_what_to_use():
    with pytest.raises(ParameterError, match="no CUDA GPU.*device='cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_bad_device_name():
    with pytest.raises(ParameterError, match="not a torch device"):
        resolve_device("gpu please")


def test_setup_seeds_python_numpy_and_torch():
    setup("smoke", "cpu", 7, SIZES)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    setup("smoke", "cpu", 7, SIZES)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("value", [0, -0.1, "1", True, None])
def test_positive_rejects(value):
    with pytest.raises(ParameterError, match="must be a positive"):
        positive("beta", value, float)
