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
