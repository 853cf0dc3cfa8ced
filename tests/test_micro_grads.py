"""One-pass micro-batch gradient norms (critbatch.micro_grads) equal those of k separate passes,
wherever examples do not interact, and those of torch.func per-example gradients for every
transformer rule (Linear over sequences, LayerNorm, RMSNorm, Embedding, positions, tied
embeddings), per example (k = B) and per micro-batch (k < B); a model with BatchNorm is measured
by k passes, each micro-batch normalised with its own statistics (the data-parallel definition),
exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from critbatch.gns import micro_batch_sq_norms
from critbatch.micro_grads import (MicroBatchNorms, PositionalEmbedding, _conv, _embedding_sq_norm_without_shares,
                                   _linear_sq_norm_without_shares)
from critbatch.tasks import build_task
from critbatch.tasks.models import CifarResNet
from critbatch.steps import compute_gradients
from critbatch.tasks.text import Block, CharTransformer
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
    assert not MicroBatchNorms(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))).supported
    assert not MicroBatchNorms(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")).supported
    assert MicroBatchNorms(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4, affine=False))).supported
    record = train({"task": {"name": "digits", "hidden": 16}, "batch_size": 32, "device": "cpu",
                    "budget": {"max_steps": 30}})
    assert record["summary"]["noise_measurement"] == "one pass"
    assert not MicroBatchNorms(conv_net(batchnorm=True)).supported


# ---------------------------------------------------------------------------------------------
# Transformer layers: every rule against per-example gradients from torch.func
# ---------------------------------------------------------------------------------------------

VOCAB, LENGTH, BATCH = 7, 6, 8


def torch_func_norms(model, loss_fn, x, y, k):
    """The reference, independent of critbatch's rules: per-example gradients by vmap(grad) of
    functional_call on one example at a time (tied parameters stay tied), micro-batch j's
    gradient the mean of its examples' (the loss is a mean over examples)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def example_loss(params, xi, yi):
        output = functional_call(model, ({**params, **frozen}, buffers), (xi.unsqueeze(0),))
        return loss_fn(output, yi.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_example.values()], dim=1)
    micro = flat.reshape(k, -1, flat.shape[1]).mean(1)
    return micro.pow(2).sum(1).mean(), micro.mean(0).pow(2).sum()


def sequence_loss(output, target):
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


class OverSequence(nn.Module):
    """A layer applied to [B, T, width] activations between a Linear in and a Linear head."""

    def __init__(self, layer, width=8, features=3):
        super().__init__()
        self.inp, self.layer, self.head = nn.Linear(features, width), layer, nn.Linear(width, VOCAB)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.inp(x)))))


class TokenModel(nn.Module):
    """Token ids [B, T] -> Embedding (+ positions) -> Linear head, optionally tied."""

    def __init__(self, vocab=VOCAB, width=8, tied=False, positions=None, padding_idx=None):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.positions = PositionalEmbedding(positions, width) if positions else nn.Identity()
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=not tied)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.positions(self.tokens(ids)))))


TRANSFORMER_CASES = {  # name: (model, input kind)
    "linear_over_sequence_gram": (lambda: OverSequence(nn.Linear(32, 32), width=32), "floats"),
    "linear_over_sequence_shares": (lambda: OverSequence(nn.Linear(8, 8)), "floats"),
    "layer_norm": (lambda: OverSequence(nn.LayerNorm(8)), "floats"),
    "layer_norm_without_bias": (lambda: OverSequence(nn.LayerNorm(8, bias=False)), "floats"),
    "rms_norm": (lambda: OverSequence(nn.RMSNorm(8)), "floats"),
    "rms_norm_eps": (lambda: OverSequence(nn.RMSNorm(8, eps=1e-3)), "floats"),
    "embedding_repeated_ids": (lambda: TokenModel(), "ids"),
    "embedding_large_vocabulary": (lambda: TokenModel(vocab=60), "ids"),
    "embedding_padding_idx": (lambda: TokenModel(padding_idx=0), "ids"),
    "positional_embedding": (lambda: TokenModel(positions=LENGTH + 3), "ids"),
    "tied_embeddings": (lambda: TokenModel(tied=True, positions=LENGTH), "ids"),
    "attention_block": (lambda: OverSequence(Block(8, 2, LENGTH)), "floats"),
    "char_transformer": (lambda: CharTransformer(VOCAB, context=LENGTH, width=8, layers=2, heads=2), "ids"),
    "char_transformer_untied": (lambda: CharTransformer(VOCAB, context=LENGTH, width=8, layers=1, heads=2,
                                                        tie_embeddings=False), "ids"),
}


def transformer_batch(kind, generator):
    x = (torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator) if kind == "ids"
         else torch.randn(BATCH, LENGTH, 3, generator=generator, dtype=torch.float64))
    return x, torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)


@pytest.mark.parametrize("k", [BATCH, 4], ids=["per_example", "micro_batches"])
@pytest.mark.parametrize("case", TRANSFORMER_CASES)
def test_transformer_rules_equal_torch_func_per_example_gradients(case, k):
    torch.manual_seed(0)
    make, kind = TRANSFORMER_CASES[case]
    model = make().double()
    for p in model.parameters():  # no parameter left at an exact 0 or 1 (LayerNorm's init) that could hide a term
        p.data.add_(0.1 * torch.randn_like(p))
    x, y = transformer_batch(kind, torch.Generator().manual_seed(1))
    if kind == "ids":
        x[0, :3] = x[0, 3]  # an id repeated inside one example: its rows add up before squaring
    expected_small, expected_big = torch_func_norms(model, sequence_loss, x, y, k)
    small, big = one_pass_norms(model, sequence_loss, x, y, k)
    assert float(small) == pytest.approx(float(expected_small), rel=1e-10)
    assert float(big) == pytest.approx(float(expected_big), rel=1e-10)
    assert float(small) > float(big) > 0


def test_each_path_of_the_rules_is_taken_by_its_case():
    """Both ways of each rule are checked above: Gram form and shares for Linear over a sequence,
    the per-id sums and the table's shares for Embedding."""
    a, d = torch.randn(BATCH, LENGTH, 32), torch.randn(BATCH, LENGTH, 32)
    for k in (BATCH, 4):
        assert _linear_sq_norm_without_shares(nn.Linear(32, 32), a, d, k) is not None  # rows*(in+out) < in*out
        assert _linear_sq_norm_without_shares(nn.Linear(8, 8), a[..., :8], d[..., :8], k) is None
        ids, d8 = torch.randint(0, VOCAB, (BATCH, LENGTH)), torch.randn(BATCH, LENGTH, 8)
        assert _embedding_sq_norm_without_shares(nn.Embedding(60, 8), ids, d8, k) is not None
        assert _embedding_sq_norm_without_shares(nn.Embedding(VOCAB, 8), ids, d8, 4) is None


def test_tied_embeddings_need_the_cross_term():
    """The tied case above can fail: squaring the table's shares from the Embedding and from the
    head apart (the shortcut keyed on a module called once) gives what an untied twin with the same
    values gives, which misses 2 k sum_j <share_emb_j, share_head_j>. Only the table trains here,
    so the cross term is not diluted by the other parameters' norms."""
    torch.manual_seed(0)
    tied, untied = TokenModel(tied=True).double(), TokenModel(tied=False).double()
    untied.load_state_dict({**tied.state_dict(), "head.bias": torch.zeros(VOCAB, dtype=torch.float64)})
    for model in (tied, untied):
        for name, p in model.named_parameters():
            p.requires_grad_(name in ("tokens.weight", "head.weight"))
    assert tied.head.weight is tied.tokens.weight and torch.equal(untied.head.weight, untied.tokens.weight)
    x, y = transformer_batch("ids", torch.Generator().manual_seed(1))
    expected_small, _ = torch_func_norms(tied, sequence_loss, x, y, 4)
    squared_apart, _ = one_pass_norms(untied, sequence_loss, x, y, 4)
    assert float(one_pass_norms(tied, sequence_loss, x, y, 4)[0]) == pytest.approx(float(expected_small), rel=1e-10)
    assert abs(float(squared_apart) / float(expected_small) - 1) > 1e-3  # (3% here) far outside the 1e-10 above


@pytest.mark.parametrize("layer", [lambda: nn.MultiheadAttention(8, 2, batch_first=True),
                                   lambda: nn.Embedding(VOCAB, 8, max_norm=1.0),
                                   lambda: nn.Embedding(VOCAB, 8, scale_grad_by_freq=True),
                                   lambda: nn.Embedding(VOCAB, 8, sparse=True)],
                         ids=["multihead_attention", "embedding_max_norm", "embedding_scale_grad_by_freq",
                              "embedding_sparse"])
def test_layers_without_an_exact_rule_are_not_supported(layer):
    assert not MicroBatchNorms(nn.Sequential(layer(), nn.Linear(8, 3))).supported
