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


def test_a_run_prints_as_one_line_with_its_sizes():
    import torch

    from prefdyn.params import Run

    run = Run("ci", torch.device("cpu"), 3, {"steps": 30, "lr": 3e-5})
    assert str(run) == "scale ci on cpu, seed 3; sizes: steps=30, lr=3e-05"
    assert "\n" not in str(run) and repr(run).startswith("Run(")


def test_start_makes_numpy_print_plain_numbers():
    import numpy as np

    from prefdyn.experiments import start

    before = np.get_printoptions()
    try:
        start("smoke", "cpu", 0, {s: {} for s in ("smoke", "ci", "full")})
        assert repr(np.float64(0.5)) == "0.5" and str([np.float64(0.25)]) == "[0.25]"
    finally:
        np.set_printoptions(**before)
