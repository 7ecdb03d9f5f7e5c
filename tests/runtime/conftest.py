import os

import pytest

from netcarve.runtime import kernel_status


@pytest.fixture(scope="session")
def kernels():
    """The compiled kernel module. A build failure fails the tests that need it (not a silent skip), unless
    the kernels were switched off on purpose with NETCARVE_KERNELS=off."""
    st = kernel_status()
    if not st["available"]:
        if os.environ.get("NETCARVE_KERNELS", "").lower() in ("0", "off", "false", "no"):
            pytest.skip("native kernels disabled by NETCARVE_KERNELS=off")
        pytest.fail(f"native kernels did not build: {st['reason']}")
    from netcarve.runtime import load_kernels

    return load_kernels()
