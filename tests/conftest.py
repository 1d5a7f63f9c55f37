import pytest

from prefdyn import models


@pytest.fixture(scope="session")
def smol():
    """The real packaged SmolLM2-135M-Instruct, loaded once for the whole test session."""
    return models.load_policy("smollm2-135m", "cpu")
