"""The GPU path's choices, checked on CPU: evaluation in true float32 (TF32 off, the previous flags
restored), TF32 for training only when asked, the memory format by device, 1x1 float32 convolutions in the
input's layout, an IS-NLL independent of the samples per forward pass (its whole-batch sharding:
tests/test_distributed.py). torch's fp32_precision flags exist on a CPU build (they act on CUDA only); the CUDA
device in `test_memory_format_by_device` is a torch.device object, no GPU is used."""
from __future__ import annotations

import pytest
import torch

from dvp.core.config import compose
from dvp.evaluate.sharded import _is_nll_sum, evaluate_elbo
from dvp.model.blocks import Float32Conv2d
from dvp.model.precision import configure_training, float32_math, memory_format
from dvp.train.loop import prepare

TINY = ["model.num_ch=16", "model.diffusion.T=5", "eval.is_samples=4", "eval.is_chunk=2", "eval.batch_size=3",
        "wandb.mode=disabled"]


def flags() -> tuple[str, str]:
    """(cuDNN convolution, CUDA matmul) float32 precision."""
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.fixture
def tf32_training():
    """Training configured with train.tf32=true; the process's flags restored after the test."""
    with float32_math(tf32=True):
        configure_training(True, torch.device("cpu"))
        yield


def test_float32_math_sets_and_restores_the_flags() -> None:
    with float32_math(tf32=True):
        assert flags() == ("tf32", "tf32")
        with float32_math(tf32=False):
            assert flags() == ("ieee", "ieee")
        assert flags() == ("tf32", "tf32")
        with pytest.raises(RuntimeError), float32_math(tf32=False):
            raise RuntimeError("an error inside still restores")
        assert flags() == ("tf32", "tf32")


def test_configure_training_follows_train_tf32() -> None:
    with float32_math(tf32=True):
        configure_training(False, torch.device("cpu"))
        assert flags() == ("ieee", "ieee")
        configure_training(True, torch.device("cpu"))
        assert flags() == ("tf32", "tf32")


def test_validation_test_elbo_and_is_nll_run_in_true_float32(tf32_training) -> None:
    """With TF32 training, every evaluation forward pass (seen by a forward hook) runs with TF32 off, for
    eval.precision fp32 and bf16; the training flags are back after each."""
    data, model = prepare(compose(TINY))
    seen: list[tuple[str, str]] = []
    model.register_forward_hook(lambda *_: seen.append(flags()))
    for precision in ("fp32", "bf16"):
        cfg = compose(TINY + [f"eval.precision={precision}"])
        evaluate_elbo(model, data.test[:5], cfg)
        with torch.no_grad():
            _is_nll_sum(model, data.test[:5], cfg, None, 0, progress_period=60)
        assert flags() == ("tf32", "tf32")
    assert len(seen) == 2 * (1 + 2 * 2) and set(seen) == {("ieee", "ieee")}   # 1 ELBO + 2 batches x 2 chunks


def test_memory_format_by_device() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compose([]).train.channels_last is None                    # default: by device
    assert memory_format(None, cuda) == torch.channels_last
    assert memory_format(None, cpu) == torch.contiguous_format         # CPU unchanged
    assert memory_format(False, cuda) == torch.contiguous_format
    assert memory_format(True, cpu) == torch.channels_last
    assert compose(["train.channels_last=true"]).train.channels_last is True


@pytest.mark.parametrize("memory", [torch.contiguous_format, torch.channels_last])
def test_float32_1x1_conv_computes_in_the_input_layout(memory: torch.memory_format) -> None:
    torch.manual_seed(0)
    head = Float32Conv2d(8, 5, 1)
    x = torch.randn(3, 8, 6, 7).to(memory_format=memory)
    out = head(x)
    assert out.is_contiguous(memory_format=memory)
    exact = torch.nn.functional.conv2d(x, head.weight, head.bias)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)


def test_is_nll_does_not_depend_on_the_chunks_per_forward_pass() -> None:
    """K=7 in chunks of 2: passes of 1, 2 or 4 chunks (the last pass shorter) see the same draws, so the same
    estimate up to float rounding; another is_chunk changes the draws, so the estimate."""
    data, model = prepare(compose(TINY))
    x = data.test[:5]

    def is_nll(*overrides: str, chunk: int = 2) -> float:
        base = [o for o in TINY if not o.startswith(("eval.is_samples=", "eval.is_chunk="))]
        with torch.no_grad():
            cfg = compose(base + ["eval.is_samples=7", f"eval.is_chunk={chunk}", *overrides])
            return _is_nll_sum(model, x, cfg, None, 0, progress_period=60)

    one = is_nll("eval.chunks_per_pass=1")
    assert is_nll() == one                                     # null on CPU: one chunk per pass
    assert is_nll("eval.chunks_per_pass=2") == pytest.approx(one, rel=1e-6)
    assert is_nll("eval.chunks_per_pass=4") == pytest.approx(one, rel=1e-6)
    assert is_nll(chunk=3) != pytest.approx(one, rel=1e-6)
