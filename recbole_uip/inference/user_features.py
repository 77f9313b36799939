"""What the profile encoder reads: each user's history as one vector, from item embeddings of the frozen LLM.

A departure from the paper (which learns each user's soft token from scratch), measured before it was chosen
(docs/method.md):

* **Item embeddings** ``e[i] (H,)``: one forward-only pass of the frozen LLM over each item's text (the same text
  the behaviour writes, without the rating), mean of the hidden states of layer ``uip_item_embedding_layer``.
  An item is embedded once, whichever users rated it: on ml-100k 1.6k items (16k tokens, seconds), against a
  pass over every user's history text.
* **User vector** ``x[u] (F,)`` from the user's items ``e`` (standardised over items) and ratings ``r``::

      taste      = sum_i e_i / (n + m)                 (H)   what the user interacts with
      rated      = sum_i e_i (r_i - r_mean) / (n + m)  (H)   what they like and dislike   [with ratings]
      generosity = sum_i (r_i - r_mean) / (n + m)      (1)   how generously they rate     [with ratings]
      spread     = sqrt(sum_i (r_i - r_mean)^2 / (n + m))                                 [with ratings]
      activity   = log(1 + n)

  ``m = uip_history_prior`` pseudo-interactions at the population mean shrink a user with few interactions
  towards the average user instead of letting one item define them (a new user, issue "New users").
* **Encoder input** ``z[u] (k,)``: ``x[u]`` standardised over the training users; the two vector parts (taste,
  rated) projected on their top ``uip_encoder_dims - s`` principal directions, each scaled to unit variance (PCA
  whitening), and the ``s`` single statistics (generosity, spread, activity) kept as their own directions.
  Measured on ml-100k: a PCA of the whole vector left generosity, one column among 1,155, almost out of the top
  32 directions, and k-means IDs over it lost to the same construction over genre multi-hots (41 columns)
  by 0.004-0.005 AUC where user_id is not a feature.

Everything here is fitted on the training split's users and stored in the feature bank, so a user who is not in
the bank gets ``z`` from their items alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm import tqdm

from recbole_uip.inference.distributed import Communicator


@torch.inference_mode()
def embed_items(llm, texts: list[str], layer: int = -1, batch_size: int = 64, show_progress: bool = False,
                part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Mean hidden state of layer ``layer`` over the tokens of ``" " + text`` for each text: float32 ``(I, H)``.

    Texts are batched shortest first (little padding); the result is in the order of ``texts``. ``part = (r, W)``
    computes only the batches ``b`` with ``b % W == r`` and leaves the other rows zero: rank ``r`` of ``W`` computes
    its share of exactly the batches one process would, so the ranks' sum is the single process's result bit for
    bit (in bfloat16 too, where other batches would round differently)."""
    from recbole_uip.inference.prompt import leading_bos

    tokenizer, model = llm.tokenizer, llm.model
    lead = leading_bos(tokenizer)           # a model trained with BOS reads it first; its state is not averaged
    ids = [lead + (tokenizer(" " + text, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id])
           for text in texts]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out = torch.zeros(len(ids), llm.hidden_size)
    rank, world = part
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)][rank::world]
    bar = tqdm(total=sum(map(len, batches)), desc="UIP item embeddings", ncols=100, disable=not show_progress,
               leave=False)
    for rows in batches:
        width = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, : len(ids[i])] = torch.tensor(ids[i])
            valid[r, : len(ids[i])] = 1
        hidden = model(input_ids=batch.to(llm.device), attention_mask=valid.to(llm.device), output_hidden_states=True,
                       use_cache=False).hidden_states[layer].float().cpu()
        counted = valid.clone()
        counted[:, : len(lead)] = 0
        out[torch.tensor(rows)] = (hidden * counted[..., None]).sum(1) / counted.sum(1, keepdim=True)
        bar.update(len(rows))
    bar.close()
    return out


@dataclasses.dataclass
class UserFeatureMap:
    """From a user's items and ratings to the encoder input ``z (k,)`` (see module docstring).

    Attributes:
        item_mean, item_std: float32 ``(H,)``, the item embeddings' standardisation.
        rating_mean: mean training rating, or None where the text has no rating.
        prior: ``m``, pseudo-interactions at the population mean.
        feature_mean, feature_std: float32 ``(F,)``, the user vectors' standardisation over training users.
        projection: float32 ``(F, k)``, PCA whitening.
    """

    item_mean: np.ndarray
    item_std: np.ndarray
    rating_mean: float | None
    prior: float
    feature_mean: np.ndarray
    feature_std: np.ndarray
    projection: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    @classmethod
    def fit(cls, item_embeddings: torch.Tensor, items: list[np.ndarray], ratings: list[np.ndarray] | None,
            dims: int, prior: float, comm: Communicator | None = None) -> "UserFeatureMap":
        """Fit on the training users' histories (``items[u]`` index rows of ``item_embeddings (I, H)``).

        ``k = min(dims, U - 1, F)``: a direction must have variance over the users. With ``comm``, ``items`` and
        ``ratings`` are this rank's users: the means, variances and the ``(F, F)`` covariance are summed over the
        ranks, and the principal directions come from its eigendecomposition (each direction's sign fixed so
        that its largest entry is positive), so every rank fits the same map from its own users."""
        comm = comm or Communicator()
        e = item_embeddings.double()
        item_mean, item_std = e.mean(0), e.std(0).clamp(min=1e-6) if e.shape[0] > 1 else torch.ones(e.shape[1])
        rating_mean = None
        if ratings is not None:
            flat = np.concatenate(ratings) if ratings else np.zeros(0)
            total = comm.sum(torch.tensor([float(flat.astype(np.float64).sum()), float(len(flat))], dtype=torch.float64))
            rating_mean = float(total[0] / total[1].clamp(min=1))
        partial = cls(item_mean.float().numpy(), item_std.float().numpy(), rating_mean, float(prior),
                      np.zeros(0), np.zeros(0), np.zeros((0, 0)))
        x = partial.raw(item_embeddings, items, ratings).double()                  # (U_r, F): this rank's users
        users = comm.count(x.shape[0])
        mean = comm.sum(x.sum(0)) / max(users, 1)
        std = (comm.sum(((x - mean) ** 2).sum(0)) / max(users - 1, 1)).sqrt().clamp(min=1e-6)
        standard = (x - mean) / std                                                  # mean 0 over all users
        scalars = partial.num_scalars
        vectors = standard[:, : x.shape[1] - scalars]                                # (U_r, F - s): taste, rated
        variance, directions = torch.linalg.eigh(comm.sum(vectors.T @ vectors))      # ascending
        variance, directions = variance.flip(0).clamp(min=0), directions.flip(1)     # (F - s,), (F - s, F - s)
        k = max(1, min(dims - scalars, users - 1, vectors.shape[1]))
        directions = directions[:, :k]
        largest = directions.abs().argmax(0)
        directions = directions * torch.sign(directions[largest, torch.arange(k)])[None, :]
        scale = (variance[:k] / max(users - 1, 1)).sqrt().clamp(min=1e-6)
        projection = torch.zeros(x.shape[1], k + scalars, dtype=torch.float64)       # (F, k + s), block diagonal
        projection[: vectors.shape[1], :k] = directions / scale
        projection[vectors.shape[1]:, k:] = torch.eye(scalars, dtype=torch.float64)
        return dataclasses.replace(partial, feature_mean=mean.float().numpy(), feature_std=std.float().numpy(),
                                   projection=projection.float().numpy())

    @property
    def num_scalars(self) -> int:
        """The user vector's last columns that are single statistics (generosity, spread, activity)."""
        return 1 if self.rating_mean is None else 3

    @property
    def column_names(self) -> list[str]:
        """Names of the ``k`` columns of ``z``: the principal directions of the item vectors (``pc1``, ...), then
        the single statistics."""
        statistics = ["activity"] if self.rating_mean is None else ["generosity", "spread", "activity"]
        return [f"pc{i + 1}" for i in range(self.dims - len(statistics))] + statistics

    def raw(self, item_embeddings: torch.Tensor, items: list[np.ndarray], ratings: list[np.ndarray] | None) -> torch.Tensor:
        """The user vectors ``x (B, F)`` of ``B`` histories (``items[b]``: rows of ``item_embeddings``)."""
        counts = torch.tensor([len(history) for history in items], dtype=torch.float32)               # (B,)
        owner = torch.repeat_interleave(torch.arange(len(items)), counts.long())                     # (N,)
        flat = torch.as_tensor(np.concatenate(items) if len(owner) else np.zeros(0), dtype=torch.long)  # (N,)
        # standardise only the rows used (the same values as standardising every item first, at the cost of N rows)
        e = (torch.as_tensor(item_embeddings)[flat].float() - torch.from_numpy(self.item_mean)) \
            / torch.from_numpy(self.item_std)                                                         # (N, H)
        denominator = (counts + self.prior).clamp(min=1e-6)[:, None]

        def per_user(values: torch.Tensor) -> torch.Tensor:      # (N, C) -> (B, C) sums over each user's items
            return torch.zeros(len(items), values.shape[1]).index_add_(0, owner, values) / denominator

        parts = [per_user(e)]
        if self.rating_mean is not None:
            centred = (torch.as_tensor(np.concatenate(ratings) if len(owner) else np.zeros(0), dtype=torch.float32)
                       - self.rating_mean)[:, None]                                                    # (N, 1)
            parts += [per_user(e * centred), per_user(centred), per_user(centred ** 2).sqrt()]
        parts.append(torch.log1p(counts)[:, None])
        return torch.cat(parts, dim=1)

    def __call__(self, item_embeddings: torch.Tensor, items: list[np.ndarray], ratings: list[np.ndarray] | None) -> torch.Tensor:
        """The encoder inputs ``z (B, k)`` of ``B`` histories."""
        x = self.raw(item_embeddings, items, ratings)
        standard = (x - torch.from_numpy(self.feature_mean)) / torch.from_numpy(self.feature_std)
        return standard @ torch.from_numpy(self.projection)

    def arrays(self, prefix: str = "features_") -> dict[str, np.ndarray]:
        """The map as named arrays (for the bank)."""
        return {prefix + name: np.asarray(getattr(self, name), dtype=np.float32)
                for name in ("item_mean", "item_std", "feature_mean", "feature_std", "projection")}

    @classmethod
    def from_arrays(cls, arrays, rating_mean: float | None, prior: float, prefix: str = "features_") -> "UserFeatureMap":
        return cls(*(np.asarray(arrays[prefix + name]) for name in ("item_mean", "item_std")), rating_mean, prior,
                   *(np.asarray(arrays[prefix + name]) for name in ("feature_mean", "feature_std", "projection")))
