"""One-pass micro-batch gradient norms (critbatch.micro_grads) equal those of k separate passes,
wherever examples do not interact; a model with BatchNorm is measured by k passes, each
micro-batch normalised with its own statistics (the data-parallel definition), exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from critbatch.gns import micro_batch_sq_norms
import copy

from critbatch.micro_grads import MicroBatchNorms, _conv
from critbatch.tasks import build_task
from critbatch.tasks.models import CifarResNet
from critbatch.steps import compute_gradients
from critbatch.train import train

K = 4


def k_pass_norms(model, loss_fn, x, y, k):
    """The reference: k forward/backward passes of B/k examples each."""
    params = [p for p in model.parameters() if p.requires_grad]
    micro = [torch.autograd.grad(loss_fn(model(xs), ys), params) for xs, ys in zip(x.chunk(k), y.chunk(k))]
    return micro_batch_sq_norms(micro)


def one_pass_norms(model, loss_fn, x, y, k):
    norms = MicroBatchNorms(model)
    assert norms.supported
    model.zero_grad(set_to_none=True)
    with norms.recording():
        loss_fn(model(x), y).backward()
    return norms.sq_norms(k)


class Shared(nn.Module):
    """A layer used twice (its gradient sums over both uses) and a frozen one."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.weight.requires_grad_(False)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(self.frozen(x))))))


class SequenceMLP(nn.Module):
    """Linear over [B, T, features]: a micro-batch's gradient sums over its examples' positions."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(F.relu(self.layer(x)).mean(1))


def conv_net(batchnorm: bool = False) -> nn.Module:
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),  # in-place right after the layer
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=not batchnorm), norm(8), nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False), norm(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    )


def conv1d_net() -> nn.Module:
    """MNIST-1D's reference CNN in small: strided 1-D convolutions, then a linear head."""
    return nn.Sequential(nn.Conv1d(1, 5, 5, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(5, 4, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
                         nn.Conv1d(4, 4, 3, stride=1, padding=2, dilation=2, groups=2, bias=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5, 3))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)), (10,)),
    "wide_without_bias": (lambda: nn.Sequential(nn.Linear(10, 32, bias=False), nn.Tanh(), nn.Linear(32, 3)), (10,)),
    "shared_and_frozen": (Shared, (6,)),
    "sequence": (SequenceMLP, (9, 5)),
    "conv": (lambda: conv_net(batchnorm=False), (3, 8, 8)),
    "conv1d": (conv1d_net, (1, 20)),
}


@pytest.mark.parametrize("case", CASES)
def test_one_pass_equals_k_passes_when_examples_do_not_interact(case):
    torch.manual_seed(0)
    make, shape = CASES[case]
    model = make().double()
    x, y = torch.randn(16, *shape, dtype=torch.float64), torch.randint(0, 3, (16,))
    expected_small, expected_big = k_pass_norms(model, F.cross_entropy, x, y, K)
    small, big = one_pass_norms(model, F.cross_entropy, x, y, K)
    assert float(small) == pytest.approx(float(expected_small), rel=1e-10)
    assert float(big) == pytest.approx(float(expected_big), rel=1e-10)
    assert float(small) > float(big) > 0  # a real spread, not two zeros


def test_grouped_and_per_micro_batch_convolution_shares_agree():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    a, d = torch.randn(8, 4, 9, 9, dtype=torch.float64), torch.randn(8, 6, 5, 5, dtype=torch.float64)
    grouped, looped = _conv(conv, a, d, K, grouped=True), _conv(conv, a, d, K, grouped=False)
    for g, h in zip(grouped, looped):
        assert g.shape[0] == K and torch.allclose(g, h, rtol=1e-10)
    conv1d = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2).double()
    a, d = torch.randn(8, 4, 9, dtype=torch.float64), torch.randn(8, 6, 5, dtype=torch.float64)
    for g, h in zip(_conv(conv1d, a, d, K, grouped=True), _conv(conv1d, a, d, K, grouped=False)):
        assert g.shape[0] == K and torch.allclose(g, h, rtol=1e-10)


def per_micro_batch_autograd(model, loss_fn, x, y, k):
    """The reference, written independently of critbatch: each micro-batch through its own copy of
    the model in training mode (BatchNorm normalises it with its own statistics), gradients by
    autograd, flattened."""
    grads = []
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        replica = copy.deepcopy(model)
        loss = loss_fn(replica(xs), ys)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(replica.parameters()))]))
    return torch.stack(grads)


@pytest.mark.parametrize("make, shape", [(lambda: conv_net(batchnorm=True), (3, 8, 8)),
                                         (lambda: CifarResNet(depth=8), (3, 16, 16))])
def test_batchnorm_micro_batch_gradients_are_the_data_parallel_ones(make, shape):
    torch.manual_seed(0)
    model = make().double().train()
    assert not MicroBatchNorms(model).supported  # no one-pass rule: it would not be exact
    x, y = torch.randn(16, *shape, dtype=torch.float64), torch.randint(0, 10, (16,))
    reference = per_micro_batch_autograd(model, F.cross_entropy, x, y, K)
    model.zero_grad(set_to_none=True)
    task = build_task("digits")  # its cross-entropy loss and metrics; the model is ours
    _, (small, big) = compute_gradients(model, task, x, y, K, rules=None)
    small, big = float(small), float(big)
    assert small == pytest.approx(float(reference.pow(2).sum(1).mean()), rel=1e-10)
    assert big == pytest.approx(float(reference.mean(0).pow(2).sum()), rel=1e-10)
    update = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(update, reference.mean(0), rtol=1e-10, atol=1e-14)  # the data-parallel update
    # the test can fail: normalising the whole batch at once gives another gradient
    whole = copy.deepcopy(model)
    whole.zero_grad()
    F.cross_entropy(whole(x), y).backward()
    full = torch.cat([p.grad.reshape(-1) for p in whole.parameters()])
    assert not torch.allclose(full, reference.mean(0), rtol=1e-3)


def test_models_with_other_parameterised_layers_take_k_passes(tmp_path):
    assert not MicroBatchNorms(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))).supported
    assert not MicroBatchNorms(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")).supported
    assert MicroBatchNorms(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False))).supported
    record = train({"task": {"name": "digits", "hidden": 16}, "batch_size": 32, "device": "cpu",
                    "budget": {"max_steps": 30}})
    assert record["summary"]["noise_measurement"] == "one pass"
    assert not MicroBatchNorms(conv_net(batchnorm=True)).supported
