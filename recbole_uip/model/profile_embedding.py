"""Embedding of a user's profile IDs, and a user-embedding table with the profiles added.

A user ``u`` with profile IDs ``(c_1, ..., c_P)`` (one per profile, from the ``uip_*`` columns of ``.user``) gets
``p(u) = sum_p E_p[c_p]``, one small table ``E_p`` per profile. The sum keeps the width of the representation it
is added to, so it fits any model without resizing its layers; the ID ``0`` (RecBole's padding, a user absent
from ``.user``) maps to a zero vector.
"""

from __future__ import annotations

import torch
from torch import nn


class UserProfileEmbedding(nn.Module):
    """``users (B,) -> (B, D)``: the sum of the user's profile-ID embeddings.

    Args:
        profile_ids: ``(U, P)`` long tensor, row ``u`` = RecBole's internal token ids of user ``u``'s profiles
            (0 = padding). Stored as a buffer, so it travels with the model's checkpoint.
        cardinalities: ``P`` table sizes (``dataset.num(field)``: every token of the field plus padding).
        dim: ``D``, the width of the representation the profile vector is added to.
        std: standard deviation of the normal initialisation (chosen by the caller to match the scale of the
            representation it is added to).
    """

    def __init__(self, profile_ids: torch.Tensor, cardinalities: list[int], dim: int, std: float):
        super().__init__()
        if profile_ids.dim() != 2 or profile_ids.shape[1] != len(cardinalities):
            raise ValueError(f"profile_ids must be (users, {len(cardinalities)}), got {tuple(profile_ids.shape)}")
        self.register_buffer("profile_ids", profile_ids.long().clone())
        self.tables = nn.ModuleList(nn.Embedding(n, dim, padding_idx=0) for n in cardinalities)
        for table in self.tables:
            nn.init.normal_(table.weight, std=std)
            with torch.no_grad():
                table.weight[0].zero_()

    @property
    def num_users(self) -> int:
        return self.profile_ids.shape[0]

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        """``users`` of any shape ``S`` -> ``S + (D,)``."""
        ids = self.profile_ids[users]                                     # S + (P,)
        return sum(table(ids[..., p]) for p, table in enumerate(self.tables))

    def table(self) -> torch.Tensor:
        """``(U, D)``: the profile vector of every user."""
        return sum(table(self.profile_ids[:, p]) for p, table in enumerate(self.tables))

    @torch.no_grad()
    def set_profile_ids(self, users: torch.Tensor, ids: torch.Tensor) -> None:
        """Give ``users (N,)`` the profile ids ``(N, P)`` (e.g. users folded in after training)."""
        self.profile_ids[users] = ids.to(self.profile_ids)


class ProfileFusedEmbedding(nn.Module):
    """Stands in for a model's user ``nn.Embedding``: ``base(u) + profiles(u)``.

    ``weight`` returns the fused ``(U, D)`` table, so models that read ``user_embedding.weight`` directly (graph
    models such as LightGCN build their propagation input from it) see the profiles too.
    """

    def __init__(self, base: nn.Embedding, profiles: UserProfileEmbedding):
        super().__init__()
        if base.num_embeddings != profiles.num_users:
            raise ValueError(f"user table has {base.num_embeddings} rows but the profile ids cover {profiles.num_users} users")
        self.base = base
        self.profiles = profiles

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def padding_idx(self):
        return self.base.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.profiles.table()

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.base(users) + self.profiles(users)
