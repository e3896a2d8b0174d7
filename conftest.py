"""Fixtures and options of every test directory (``tests``, ``harness/tests``,
``integration_tests``); the helpers they share are in ``tests/helpers.py``.

``--solver-device cuda`` (or ``RESCOMP_TEST_DEVICE=cuda``) runs the solver entry points that a
test module imports (``compensate_weight``, upstream's ``quantize_weight``, the
factorization) on that device: their tensor arguments go there and the results (and
any in-place changes of the arguments) come back to the CPU, where the tests' oracles
and assertions stay. The default is the CPU.
"""

import dataclasses
import functools
import os

import pytest
import torch

from helpers import make_model, make_tokenizer, record_solves

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: the functions a test module may import that run solver arithmetic
SOLVER_ENTRY_POINTS = ("compensate_weight", "quantize_weight", "inverse_hessian_factor",
                       "upper_triangular_inverse", "factorize_hessian")


def pytest_addoption(parser):
    parser.addoption(
        "--solver-device", default=os.environ.get("RESCOMP_TEST_DEVICE", "cpu"),
        help="device for the solver entry points (cpu, cuda, cuda:1; default: "
             "$RESCOMP_TEST_DEVICE or cpu)",
    )


def pytest_configure(config):
    device = config.getoption("--solver-device")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise pytest.UsageError(f"--solver-device {device!r} is not a torch device; use cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--solver-device {device}: torch sees no CUDA device here; use cpu")


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{
            f.name: _to_device(getattr(value, f.name), device)
            for f in dataclasses.fields(value) if f.init
        })
    return value


def _run_on(function, device):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        moved_args = [_to_device(arg, device) for arg in args]
        moved_kwargs = {key: _to_device(value, device) for key, value in kwargs.items()}
        result = function(*moved_args, **moved_kwargs)
        # some entry points work in place on their arguments (upstream's do): mirror it
        for original, moved in [*zip(args, moved_args),
                                *((kwargs[k], moved_kwargs[k]) for k in kwargs)]:
            if isinstance(original, torch.Tensor) and moved is not original:
                original.copy_(moved)
        return _to_device(result, "cpu")

    return wrapper


@pytest.fixture(autouse=True)
def solver_device(request, monkeypatch):
    """The device the solver entry points run on (see the module docstring)."""
    device = torch.device(request.config.getoption("--solver-device"))
    if device.type != "cpu" and request.module is not None:
        for name in SOLVER_ENTRY_POINTS:
            function = getattr(request.module, name, None)
            if callable(function):
                monkeypatch.setattr(request.module, name, _run_on(function, device))
    return device


@pytest.fixture
def tiny_model_dir(tmp_path_factory, request):
    kind = getattr(request, "param", "llama")
    path = tmp_path_factory.mktemp(f"tiny_{kind}")
    make_model(kind).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def solver_calls(monkeypatch):
    """Record what each module handed to the solver: module name -> its D."""
    calls = {}
    record_solves(monkeypatch, lambda names, _hessian, asymmetry: calls.update(
        {name: asymmetry for name in names}))
    return calls
