"""Test setup: one `pytest` run passes on a CPU machine and on a GPU machine.

TRITON_INTERPRET is read when a kernel is *defined* (DESIGN.md section 4), so it is decided
here, before any kernel module is imported: an explicit value in the environment wins;
otherwise the interpreter is on only when CUDA is not available (importing torch to ask is
fine, importing a kernel module is not).

Markers (the one place a test says which Triton it needs; the skip reasons say why):
- `triton_cpu`: launches Triton kernels on CPU tensors, which only the interpreter can run;
  skipped when TRITON_INTERPRET is not 1 (a GPU machine by default).
- `triton_gpu`: launches compiled Triton kernels on CUDA tensors (bf16 and other cases the
  interpreter gets wrong); skipped without a CUDA device or under the interpreter.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_cpu: launches Triton on CPU tensors (needs TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "triton_gpu: launches compiled Triton on CUDA tensors (needs a GPU, "
                                       "TRITON_INTERPRET unset or 0)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton_cpu") and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs the interpreter, and TRITON_INTERPRET is not 1 (conftest turns it "
                    "on only when CUDA is unavailable; the GPU variants of these checks are the triton_gpu tests)")
    if item.get_closest_marker("triton_gpu"):
        if not HAS_CUDA:
            pytest.skip("compiled Triton on CUDA tensors: no CUDA device (bf16 is unreliable in the interpreter)")
        if INTERPRET:
            pytest.skip("compiled Triton on CUDA tensors: TRITON_INTERPRET=1 was set explicitly, so kernels would "
                        "run in the interpreter (bf16 unreliable there)")


@pytest.fixture
def triton_device() -> str:
    """The device a Triton test can launch on: 'cpu' under the interpreter, else 'cuda'."""
    if INTERPRET:
        return "cpu"
    if not HAS_CUDA:
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device: no Triton can run")
    return "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny decoders gain nothing from threads; on the shared, loaded 2-core test box spin-waiting intra-op
    threads cost far more than they gain. Use per module: `pytestmark = pytest.mark.usefixtures(...)`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def det_ckpt(tmp_path_factory):
    """tests/export_helpers.py's tiny checkpoint (safetensors), for every test file that exports or serves it."""
    from tests.export_helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("det_ckpt"), "safetensors")


@pytest.fixture(scope="session")
def det_ckpt_export(det_ckpt, tmp_path_factory):
    """`unimlm export det --model det_ckpt --canvas 64x96`, once per session: (rc, stdout, stderr, out dir)."""
    import contextlib
    import io

    from unimlm_engine.cli.main import main

    out = tmp_path_factory.mktemp("det_ckpt_export")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["export", "det", "--model", str(det_ckpt), "--out", str(out), "--canvas", "64x96"])
    return rc, stdout.getvalue(), stderr.getvalue(), out
