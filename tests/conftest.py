import os
import sys

# Tests never touch the network: make any accidental hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tests import their shared helpers (tests/fakes.py) as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402 - after the path set-up above


@pytest.fixture
def cifar_cache(tmp_path_factory, monkeypatch):
    """A fake CIFAR10 (40 random 32×32 images) in the cifar-10-batches-py format, also found through
    $DDPM_LIB_CACHE (for the CLI)."""
    from fakes import write_fake_cifar10

    root = tmp_path_factory.mktemp("cache")
    write_fake_cifar10(root, per_batch=8)
    monkeypatch.setenv("DDPM_LIB_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def fashion_test():
    """Fashion-MNIST's test split, read from Debian's dataset-fashion-mnist: skipped where the package is not
    installed, a failure where DDPM_REQUIRE_FASHION is set (CI installs it and sets it)."""
    from ddpm_lib import data

    if not (data.FASHION_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        if os.environ.get("DDPM_REQUIRE_FASHION"):
            pytest.fail("DDPM_REQUIRE_FASHION is set but dataset-fashion-mnist is not installed")
        pytest.skip("apt-get install dataset-fashion-mnist")
    return data.load_split("fashion", "test", download=False)
