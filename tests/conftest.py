"""Session-wide test fixtures.

synthref_tiny: a SynthRef data set (`refseg make-data --preset tiny --seed 0`,
natural domain: 40 / 10 / 10 images of 320 x 320) generated once per test
session into a temporary folder. Treat it as read-only.

REFSEG_BACKEND=torch: the suite's predictors, CLI runs and servers use the
PyTorch backend unless a test names another (tests/test_backends.py covers the
ONNX Runtime default), so that no test builds ONNX graphs into the user's cache.
"""

import os

import pytest

os.environ["REFSEG_BACKEND"] = "torch"


@pytest.fixture(scope="session")
def synthref_tiny(tmp_path_factory):
    from refseg.cli import main as cli

    out = tmp_path_factory.mktemp("synthref") / "tiny"
    assert cli(["make-data", "--preset", "tiny", "--seed", "0", "--out", str(out)]) == 0
    return out
