"""Kernel tests run under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET
before anything imports triton), or on a GPU."""
import pytest
import torch

# Tolerances (relative norm, stated at each check): bf16 outputs 1e-2 (one rounding is 2^-8 relative,
# and the interpreter truncates where the GPU rounds to nearest); f16 2e-3; f32 1e-5.


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def check():
    """check(out, ref, tol): every element written (outputs start as NaN) and ||out - ref|| / ||ref|| <= tol."""
    def _check(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert torch.isfinite(out.float()).all(), "unwritten (NaN) or non-finite elements"
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err <= tol, f"relative error {err:.3g} > {tol:.1g}"
    return _check


def nan_like(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned():
    """An output buffer full of NaN, so an element a kernel forgets to write fails the check."""
    return nan_like
