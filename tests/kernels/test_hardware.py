import pytest

pytest.importorskip("triton")
import torch

from kiln.kernels import hardware


def test_programmatic_dependent_launch_only_where_it_pays():
    """Off on the CPU and under the interpreter; on a Hopper GPU, on for decode-sized launches only."""
    assert hardware.pdl(torch.device("cpu"), 1) == {"PDL": False}
    if torch.cuda.is_available() and not hardware.interpreting():
        on = torch.cuda.get_device_capability()[0] >= 9 and hardware.PDL
        assert hardware.pdl(torch.device("cuda"), 1) == ({"PDL": True, "launch_pdl": True} if on else {"PDL": False})
        assert hardware.pdl(torch.device("cuda"), hardware.PDL_MAX_ROWS + 1) == {"PDL": False}
