"""Mult-VAE (Liang et al., 2018, "Variational Autoencoders for Collaborative Filtering"): a user's item set encoded
to a Gaussian latent and decoded to a softmax over every item, trained by the multinomial log-likelihood of the set.

The count reference (``recbole_uip.count_reference``) uses it as its strongest model of a history *as a set*: unlike
EASE's regression scores, its logits are trained as a distribution over items, so it gives a calibrated probability
to every item, the unit the generalisation goal is measured in. Its architecture and optimiser are the paper's (one
hidden layer of 600, a latent of 200, input dropout 0.5, Adam at 1e-3, the KL term's weight annealed up to 0.2).
Departures, for ml-100k's 943 users and no validation split of its own: batches of 100 users (the paper: 500), a
fixed :data:`EPOCHS` passes instead of early stopping, and the KL weight reaching its cap halfway through them
(the paper anneals over a fixed count of 200,000 steps, more than these data give).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

HIDDEN = 600
LATENT = 200
DROPOUT = 0.5
LEARNING_RATE = 1e-3
BATCH_USERS = 100
EPOCHS = 100
BETA_CAP = 0.2        # the KL term's weight rises linearly to this over the first half of the steps, then stays


class MultVAE(torch.nn.Module):
    """Encoder ``I -> HIDDEN -> (mu, log variance)`` of ``LATENT`` each, decoder ``LATENT -> HIDDEN -> I`` logits,
    tanh between layers; the input is each user's binary item row, L2-normalised."""

    def __init__(self, num_items: int, hidden: int = HIDDEN, latent: int = LATENT):
        super().__init__()
        self.encoder = torch.nn.Linear(num_items, hidden)
        self.to_latent = torch.nn.Linear(hidden, 2 * latent)
        self.decoder = torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, num_items))

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` ``(B, I)`` binary -> ``(mu, log variance)``, ``(B, latent)`` each; in training mode the
        normalised input is dropped out first."""
        rows = torch.nn.functional.normalize(rows, dim=1)
        rows = torch.nn.functional.dropout(rows, DROPOUT, training=self.training)
        return self.to_latent(torch.tanh(self.encoder(rows))).chunk(2, dim=1)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows`` ``(B, I)`` binary -> ``(logits (B, I), mu (B, latent), log variance (B, latent))``; in training
        mode the input is dropped out and the latent sampled, in eval mode the latent is its mean."""
        mu, log_variance = self.encode(rows)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * log_variance) if self.training else mu
        return self.decoder(latent), mu, log_variance


def _binary_rows(matrix: sparse.spmatrix) -> torch.Tensor:
    """``(U, I)`` float32 dense: 1 where ``matrix`` holds a positive entry, else 0."""
    return torch.from_numpy((sparse.csr_matrix(matrix) > 0).toarray().astype(np.float32))


def fit_mult_vae(matrix: sparse.spmatrix, epochs: int = EPOCHS, seed: int = 0, latent: int = LATENT) -> MultVAE:
    """A :class:`MultVAE` with a ``latent``-dimensional code trained on the binary user-item ``matrix`` ``(U, I)``
    (any positive entry counts as 1) for ``epochs`` passes over the users in shuffled batches of
    :data:`BATCH_USERS`; float32, the torch threads as set. Deterministic for a given ``seed`` and thread count;
    the global random state is left as it was."""
    rows = _binary_rows(matrix)
    num_users = rows.shape[0]
    batches = max(1, -(-num_users // BATCH_USERS))
    total_steps = max(1, epochs * batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultVAE(rows.shape[1], latent=latent)
        optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        model.train()
        step = 0
        for _ in range(epochs):
            for batch in torch.randperm(num_users).chunk(batches):
                logits, mu, log_variance = model(rows[batch])
                nll = -(torch.log_softmax(logits, dim=1) * rows[batch]).sum(1).mean()
                kl = (-0.5 * (1 + log_variance - mu.pow(2) - log_variance.exp()).sum(1)).mean()
                beta = BETA_CAP * min(1.0, step / (0.5 * total_steps))
                optimiser.zero_grad()
                (nll + beta * kl).backward()
                optimiser.step()
                step += 1
    model.eval()
    return model


def item_logits(model: MultVAE, matrix: sparse.spmatrix, batch_users: int = 1024) -> np.ndarray:
    """``(U, I)`` float32: the decoder's logits for each row of the binary user-item ``matrix`` ``(U, I)`` (the
    latent at its mean, no dropout)."""
    matrix = sparse.csr_matrix(matrix)
    out = np.empty(matrix.shape, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, matrix.shape[0], batch_users):
            out[start:start + batch_users] = model(_binary_rows(matrix[start:start + batch_users]))[0].numpy()
    return out


def latent_means(model: MultVAE, matrix: sparse.spmatrix) -> np.ndarray:
    """``(U, latent)`` float32: the encoder's mean code ``mu`` of each row of the binary user-item ``matrix``
    ``(U, I)``, a user's history compressed to ``latent`` numbers (``model`` in eval mode, as :func:`fit_mult_vae`
    returns it)."""
    with torch.no_grad():
        return model.encode(_binary_rows(matrix))[0].numpy()


def user_item_matrix(histories: list[np.ndarray], num_items: int) -> sparse.csr_matrix:
    """``(U, I)`` binary: a 1 where user ``u``'s ``histories[u]`` (item indices) holds item ``i``."""
    rows = np.concatenate([np.full(len(h), u) for u, h in enumerate(histories)]) if histories else np.zeros(0)
    cols = np.concatenate(histories).astype(np.int64) if histories else np.zeros(0, dtype=np.int64)
    matrix = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(histories), num_items))
    matrix.data[:] = 1.0                                                  # a repeated item counts once
    return matrix
