"""The ports of examples/ are scripts, not a package: the tests load them by path."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the ports import their shared split_mnist module as a running script does


@pytest.fixture
def load_example():
    def load(name):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there while the file runs
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _one_thread():
    """The ports' tests run tiny networks: one thread is faster than two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
