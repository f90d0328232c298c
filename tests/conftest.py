import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine two oversubscribed
    threads were 10-50x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Calibrations made on first use go to a temporary cache, never the user's."""
    import os

    before = os.environ.get("ATTNREG_CACHE")
    os.environ["ATTNREG_CACHE"] = str(tmp_path_factory.mktemp("attnreg-cache"))
    yield
    if before is None:
        os.environ.pop("ATTNREG_CACHE", None)
    else:
        os.environ["ATTNREG_CACHE"] = before
