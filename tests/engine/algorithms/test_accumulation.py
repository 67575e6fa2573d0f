"""engine.algorithms.accumulation: the one micro-batch loop (forward -> loss -> finite check -> backward, then clip
and step) and the autocast helper."""

import contextlib
import copy
import math

import pytest
import torch

from engine.algorithms.accumulation import accumulated_step, micro_slices, mixed_precision


def _model_and_data(rows=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.randn(rows, 5, generator=g), torch.randn(rows, 3, generator=g)


def _step(model, x, y, micro_batch_size, *, bad_row=None):
    """One SGD step of the mean squared error over all rows, each micro-batch normalised by the total row count."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = x.shape[0]

    def micro_loss(sl):
        pred = model(x[sl])
        if bad_row is not None and sl.start <= bad_row < sl.stop:
            pred = pred * float("nan")
        loss = ((pred - y[sl]) ** 2).sum() / (rows * 3)
        return loss, {"abs_err": float((pred - y[sl]).detach().abs().sum()) / (rows * 3)}

    return accumulated_step(model, opt, micro_slices(rows, micro_batch_size), micro_loss, max_grad_norm=1e9)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3, 7, 100])
def test_the_step_does_not_depend_on_the_micro_batch_size(micro_batch_size):
    model, x, y = _model_and_data()
    whole, split = copy.deepcopy(model), copy.deepcopy(model)
    want = _step(whole, x, y, 7)
    got = _step(split, x, y, micro_batch_size)
    assert got.stepped and want.stepped
    for key in ("loss", "abs_err", "grad_norm"):
        assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-5), key
    assert want.metrics["loss"] == pytest.approx(float(((model(x) - y) ** 2).mean()), rel=1e-5)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole.weight, model.weight)  # the step moved the weights
    assert all(p.grad is None for p in split.parameters())  # zeroed after the step


@pytest.mark.parametrize("bad_row", [0, 4])
def test_a_non_finite_micro_batch_skips_the_step_and_every_metric_is_nan(bad_row):
    model, x, y = _model_and_data()
    before = copy.deepcopy(model)
    result = _step(model, x, y, 2, bad_row=bad_row)
    assert not result.stepped
    assert all(math.isnan(v) for v in result.metrics.values()), result.metrics
    for a, b in zip(before.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def test_a_micro_batch_may_give_its_own_loss_share():
    model, x, y = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = accumulated_step(model, opt, [slice(0, 3), slice(3, 7)],
                              lambda sl: (model(x[sl]).sum() * 0.5, {"loss": 1.25}), max_grad_norm=1.0)
    assert result.metrics["loss"] == 2.5 and result.stepped


def test_micro_slices_cover_the_rows_once():
    assert list(micro_slices(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(micro_slices(0, 3)) == []
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        list(micro_slices(4, 0))


def test_mixed_precision_is_autocast_only_with_a_dtype():
    assert isinstance(mixed_precision("cpu", None), contextlib.nullcontext)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with mixed_precision("cpu", None):
        assert (a @ b).dtype == torch.float32
    with mixed_precision("cpu", torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
