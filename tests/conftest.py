"""Session-wide test fixtures.

synthref_tiny: a SynthRef data set (`refseg make-data --preset tiny --seed 0`,
natural domain: 40 / 10 / 10 images of 320 x 320) generated once per test
session into a temporary folder. Treat it as read-only.
"""

import pytest


@pytest.fixture(scope="session")
def synthref_tiny(tmp_path_factory):
    from refseg.cli import main as cli

    out = tmp_path_factory.mktemp("synthref") / "tiny"
    assert cli(["make-data", "--preset", "tiny", "--seed", "0", "--out", str(out)]) == 0
    return out
