"""Test configuration.

The suite runs once per sglang release (scripts/run-tests.sh). The release under
test is named by SGL_ACCEL_TEST_SGLANG and lives, installed --no-deps, in
.envs/sglang-<release>/ (scripts/envs.sh). Tests marked ``sglang`` are skipped
when no release is selected; the others run in the release-free pass.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG") or None

if RELEASE:
    _site = ROOT / ".envs" / f"sglang-{RELEASE}"
    if not (_site / f"sglang-{RELEASE}.dist-info").is_dir():
        raise pytest.UsageError(f"sglang {RELEASE} is not installed in {_site}: run scripts/envs.sh")
    sys.path.insert(0, str(_site))
    # Subprocesses started by tests see the same release.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_site), os.environ.get("PYTHONPATH")]))
    # The kernel stand-ins must be in place before anything imports sglang.
    from sgl_accel.testing import standins

    standins.activate()


def pytest_collection_modifyitems(config, items):
    if RELEASE:
        return
    skip = pytest.mark.skip(reason="needs a sglang release (SGL_ACCEL_TEST_SGLANG)")
    for item in items:
        if "sglang" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sglang_release():
    """The sglang release under test, as a packaging Version."""
    if not RELEASE:
        pytest.skip("needs a sglang release")
    from packaging.version import Version

    return Version(RELEASE)


@pytest.fixture
def accel(monkeypatch):
    """Fresh sgl-accel loader state; ``accel("rocm:gfx950")`` sets the emulated hardware.

    Every patch applied during the test is reverted afterwards.
    """
    from sgl_accel import _loader

    _loader._reset_for_tests()

    def use(hardware: str):
        monkeypatch.setenv("SGL_ACCEL_HARDWARE", hardware)
        _loader._reset_for_tests()

    yield use
    _loader._reset_for_tests()


@pytest.fixture
def standins_active():
    """Stand-ins on for the test; switched off again if this fixture switched them on."""
    from sgl_accel.testing import standins

    was_active = standins.is_active()
    standins.activate()
    yield
    if not was_active:
        standins.deactivate()
