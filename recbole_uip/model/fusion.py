"""Profile fusion for RecBole models that do not read ``.user`` features, without editing RecBole's code.

``with_profiles(SASRec)`` derives, at run time, a subclass of the model that embeds each user's ``uip_*``
profile IDs (:class:`~recbole_uip.model.profile_embedding.UserProfileEmbedding`) and adds the profile vector to
the user representation the model already computes. Two mechanisms, chosen per model in :data:`MODEL_SUPPORT`:

* ``user_embedding``: models with a user-embedding table (BPR, NeuMF, LightGCN, Caser, ...). The table is wrapped
  so that every lookup, and every read of its ``weight``, returns ``user_embedding + profile vector``. The
  profiles then flow through whatever the model does with its user embedding (MF, MLP, graph propagation).
* ``sequence_output``: sequence encoders without a user table (SASRec, GRU4Rec, BERT4Rec, NARM, ...). Their
  ``forward`` returns the sequence representation that is scored against item embeddings; the subclass adds the
  profile vector to it (broadcast over positions for models that return every position, such as BERT4Rec).

Why additive fusion: the sum leaves the model's layers, shapes, losses and scoring untouched, so one mechanism
serves every model that has a user vector, and at initialisation the model is the base model plus a small
perturbation (profile tables start at the scale of the representation they join). A profile vector added to
the representation scored by ``<h, item>`` acts as a learned per-profile item preference. Gated fusion and
extra leading sequence positions would each need per-architecture code (positions also change attention
lengths and the position embeddings' range).

Every other RecBole 1.2.1 sequential and general model is listed with the reason it cannot be served; running it
with ``uip=True`` raises :class:`ProfilesNotSupportedError`, never a silent no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from recbole_uip.model.profile_embedding import ProfileFusedEmbedding, UserProfileEmbedding

NATIVE, USER_EMBEDDING, SEQUENCE_OUTPUT, UNSUPPORTED = "native", "user_embedding", "sequence_output", "unsupported"


@dataclasses.dataclass(frozen=True)
class ModelSupport:
    """How a RecBole model consumes the profile columns."""

    how: str                              # native | user_embedding | sequence_output | unsupported
    note: str = ""                        # the reason (unsupported) or what is fused (supported)
    user_tables: tuple[str, ...] = ()     # user_embedding: the attributes holding the model's user nn.Embedding(s)


def _fused(*tables: str) -> ModelSupport:
    return ModelSupport(USER_EMBEDDING, "profile vector added to " + " and ".join(f"`{t}`" for t in tables), tables)


_SEQUENCE = ModelSupport(SEQUENCE_OUTPUT, "profile vector added to the sequence representation")

MODEL_SUPPORT: dict[str, ModelSupport] = {
    # --- sequential ---------------------------------------------------------------------------------------
    "DIEN": ModelSupport(NATIVE, "embeds every loaded .user token field itself"),
    **{name: _SEQUENCE for name in ("BERT4Rec", "CORE", "FDSA", "FEARec", "FOSSIL", "GCSAN", "GRU4Rec", "GRU4RecF",
                                     "LightSANs", "NARM", "NextItNet", "SASRec", "SASRecF", "SINE", "SRGNN", "STAMP")},
    "Caser": _fused("user_embedding"), "HGN": _fused("user_embedding"), "HRM": _fused("user_embedding"),
    "NPE": _fused("user_embedding"), "SHAN": _fused("user_embedding"), "TransRec": _fused("user_embedding"),
    "FPMC": _fused("UI_emb"),
    "DIN": ModelSupport(UNSUPPORTED, "RecBole 1.2.1's DIN embeds .user features but never feeds them to its scorer, "
                                     "and its output is a score, not a user vector"),
    "RepeatNet": ModelSupport(UNSUPPORTED, "scores are a repeat/explore mixture over the session's items, with no "
                                           "user vector to extend"),
    "S3Rec": ModelSupport(UNSUPPORTED, "two-stage self-supervised pre-training whose pre-training stage has no "
                                       "user input; fusing only the fine-tuning stage is not validated"),
    "GRU4RecCPR": ModelSupport(UNSUPPORTED, "softmax-CPR scores with several hidden states at once; no single user "
                                            "vector"),
    "SASRecCPR": ModelSupport(UNSUPPORTED, "softmax-CPR scores with several hidden states at once; no single user "
                                           "vector"),
    "KSR": ModelSupport(UNSUPPORTED, "needs knowledge-graph files and pre-trained entity embeddings; fusion is not "
                                     "validated on such data"),
    "GRU4RecKG": ModelSupport(UNSUPPORTED, "needs knowledge-graph files; fusion is not validated on such data"),
    # --- general ------------------------------------------------------------------------------------------
    "BPR": _fused("user_embedding"), "NeuMF": _fused("user_mf_embedding", "user_mlp_embedding"),
    "LightGCN": _fused("user_embedding"), "NGCF": _fused("user_embedding"), "SGL": _fused("user_embedding"),
    "NCL": dataclasses.replace(_fused("user_embedding"), note="profile vector added to `user_embedding` (RecBole's "
                                                              "NCL needs `pip install faiss-cpu`)"), "DGCF": _fused("user_embedding"), "SpectralCF": _fused("user_embedding"),
    "ENMF": _fused("user_embedding"), "LINE": _fused("user_embedding"), "NNCF": _fused("user_embedding"),
    "ConvNCF": _fused("user_embedding"), "CDAE": _fused("h_user"), "SimpleX": _fused("user_emb"),
    **{name: ModelSupport(UNSUPPORTED, "no trainable user representation (popularity or random scores)")
       for name in ("Pop", "Random")},
    **{name: ModelSupport(UNSUPPORTED, "item-item model: a user is scored only through the items they "
                                       "interacted with, with no user parameters")
       for name in ("ItemKNN", "AsymKNN", "EASE", "SLIMElastic", "ADMMSLIM", "NCEPLRec", "FISM", "NAIS")},
    "DMF": ModelSupport(UNSUPPORTED, "a user is their interaction row fed through an MLP; no user embedding"),
    **{name: ModelSupport(UNSUPPORTED, "autoencoder over the user's interaction vector; no user embedding")
       for name in ("MultiVAE", "MultiDAE", "RecVAE", "MacridVAE", "RaCT", "DiffRec", "LDiffRec")},
    "GCMC": ModelSupport(UNSUPPORTED, "users enter its graph encoder as one-hot node features; no embedding "
                                      "table to extend"),
}


class ProfilesNotSupportedError(ValueError):
    """The requested model cannot consume the profile columns (running it would be a silent no-op)."""


def model_support(model_name: str, model_type=None) -> ModelSupport:
    """How ``model_name`` consumes profiles. Context-aware models embed ``.user`` token fields natively."""
    from recbole.utils import ModelType

    if model_type == ModelType.CONTEXT:
        return ModelSupport(NATIVE, "embeds every loaded .user token field")
    if model_name in MODEL_SUPPORT:
        return MODEL_SUPPORT[model_name]
    if model_type == ModelType.KNOWLEDGE:
        return ModelSupport(UNSUPPORTED, "knowledge-aware models are not covered by profile fusion")
    return ModelSupport(UNSUPPORTED, "only RecBole 1.2.1's built-in models are classified for profile fusion")


def check_model_supports_profiles(config) -> ModelSupport:
    """The model's :class:`ModelSupport`; raises :class:`ProfilesNotSupportedError` with the reason."""
    support = model_support(config["model"], config["MODEL_TYPE"])
    if support.how == UNSUPPORTED:
        raise ProfilesNotSupportedError(
            f"{config['model']} cannot use the uip_* profiles: {support.note}. Models that can: every context-aware "
            f"model, DIEN, and the sequential/general models listed in docs/models.md (e.g. SASRec, GRU4Rec, BERT4Rec, "
            f"NARM, BPR, NeuMF, LightGCN). To only write the augmented files, run: "
            f"python -m recbole_uip infer --dataset={config['dataset']}"
        )
    return support


def profile_ids_from_dataset(dataset, fields: list[str]) -> tuple[torch.Tensor, list[int]]:
    """``(U, P)`` profile token ids per internal user id, and each field's table size, from ``dataset.user_feat``.

    Raises:
        ValueError: a profile field was not loaded (``load_col`` must list it under ``user``).
    """
    user_feat = dataset.user_feat
    missing = [f for f in fields if user_feat is None or f not in user_feat.columns]
    if missing:
        raise ValueError(f"The dataset has no user field(s) {missing}: load the augmented <dataset>-uip copy with "
                         f"these fields under load_col['user'] (run_recbole_uip does this).")
    uid = dataset.uid_field
    users = user_feat[uid]
    if not torch.equal(users, torch.arange(len(users))):
        raise ValueError("RecBole's user_feat is not indexed by internal user id; cannot build the profile table.")
    ids = torch.stack([user_feat[f].long() for f in fields], dim=1)           # (U, P)
    return ids, [dataset.num(f) for f in fields]


class _ProfileFusion:
    """Base of the derived classes: builds the profile tables after the model's own ``__init__``."""

    uip_fields: tuple[str, ...] = ()

    def profile_embeddings(self) -> Iterator[UserProfileEmbedding]:
        """Every :class:`UserProfileEmbedding` of the model (one per fused user table)."""
        return (m for m in self.modules() if isinstance(m, UserProfileEmbedding))

    @torch.no_grad()
    def set_user_profile_ids(self, users: torch.Tensor, ids: torch.Tensor) -> None:
        """Give internal user ids ``users (N,)`` the profile token ids ``ids (N, P)``."""
        for embedding in self.profile_embeddings():
            embedding.set_profile_ids(users, ids)


class _UserEmbeddingFusion(_ProfileFusion):
    """Wraps the model's user embedding table(s): every user vector becomes ``user_embedding + profile vector``."""

    uip_user_tables: tuple[str, ...] = ()

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        ids, sizes = profile_ids_from_dataset(dataset, list(self.uip_fields))
        for name in self.uip_user_tables:
            base = getattr(self, name)
            std = float(base.weight.detach().float().std())
            setattr(self, name, ProfileFusedEmbedding(base, UserProfileEmbedding(ids, sizes, base.embedding_dim, std)))


class _SequenceOutputFusion(_ProfileFusion):
    """Adds the profile vector to what ``forward`` returns: ``(B, H)``, or ``(B, L, H)`` for every position.

    ``forward`` receives only item sequences, so the entry points that hold the batch (``calculate_loss``,
    ``predict``, ``full_sort_predict``) record its users for the ``forward`` calls they make.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        ids, sizes = profile_ids_from_dataset(dataset, list(self.uip_fields))
        items = self.item_embedding.weight.detach().float()
        self.uip_profile_embedding = UserProfileEmbedding(ids, sizes, items.shape[1], float(items.std()))
        self._uip_batch_users = None
        self._uip_user_field = config["USER_ID_FIELD"]

    @contextlib.contextmanager
    def _uip_users_of(self, interaction):
        previous = self._uip_batch_users
        self._uip_batch_users = interaction[self._uip_user_field]
        try:
            yield
        finally:
            self._uip_batch_users = previous

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        users = self._uip_batch_users
        if users is None:
            raise RuntimeError("forward() of a profile-fused model needs the batch's users: call calculate_loss, "
                               "predict or full_sort_predict.")
        profile = self.uip_profile_embedding(users)                       # (B, H)
        if output.dim() == 3:                                             # (B, L, H): every position
            profile = profile.unsqueeze(1)
        return output + profile

    def calculate_loss(self, interaction):
        with self._uip_users_of(interaction):
            return super().calculate_loss(interaction)

    def predict(self, interaction):
        with self._uip_users_of(interaction):
            return super().predict(interaction)

    def full_sort_predict(self, interaction):
        with self._uip_users_of(interaction):
            return super().full_sort_predict(interaction)


_DERIVED: dict[tuple[type, tuple[str, ...]], type] = {}


def with_profiles(model_class: type, fields: list[str]) -> type:
    """The subclass of ``model_class`` that consumes the profile ``fields`` (``uip_*`` token fields of ``.user``).

    Returns ``model_class`` itself for models that read ``.user`` natively. The class keeps the model's name
    (``config['model']``), so RecBole picks the same trainer; derived classes are cached, one per (model, fields).

    Raises:
        ProfilesNotSupportedError: the model has no user representation the profiles could join.
    """
    support = model_support(model_class.__name__, getattr(model_class, "type", None))
    if support.how == NATIVE:
        return model_class
    if support.how == UNSUPPORTED:
        raise ProfilesNotSupportedError(f"{model_class.__name__} cannot use the uip_* profiles: {support.note}.")
    key = (model_class, tuple(fields))
    if key not in _DERIVED:
        if support.how == USER_EMBEDDING:
            attrs = {"uip_user_tables": support.user_tables}
            mixin = _UserEmbeddingFusion
        else:
            attrs = {}
            mixin = _SequenceOutputFusion
        attrs.update(uip_fields=tuple(fields), __module__=__name__,
                     __doc__=f"{model_class.__name__} with recbole-uip profile fusion ({support.how}).")
        _DERIVED[key] = type(model_class.__name__, (mixin, model_class), attrs)
    return _DERIVED[key]


def model_class_for_run(config) -> type:
    """The class ``run_recbole_with_config`` instantiates: the model itself, or its profile-fused subclass when
    the run loads ``uip_*`` columns (``uip=True``) and the model does not read them natively."""
    from recbole_uip.compat import resolve_model_class
    from recbole_uip.config import UIPSettings

    model_class = resolve_model_class(config["model"])
    settings = UIPSettings.from_config(config)
    if not settings.enabled:
        return model_class
    return with_profiles(model_class, settings.field_names)


def support_table_markdown() -> str:
    """The table of docs/models.md: every RecBole 1.2.1 sequential and general model and how it consumes the profiles."""
    import recbole.model.general_recommender as general
    import recbole.model.sequential_recommender as sequential

    label = {NATIVE: "natively", USER_EMBEDDING: "through the extension (user embedding)",
             SEQUENCE_OUTPUT: "through the extension (sequence representation)", UNSUPPORTED: "no"}
    lines = ["| model | type | consumes the profiles | how, or why not |", "|---|---|---|---|"]
    for kind, module in (("sequential", sequential), ("general", general)):
        names = sorted((n for n in dir(module) if isinstance(getattr(module, n), type) and n[0].isupper()), key=str.lower)
        for name in names:
            support = MODEL_SUPPORT[name]
            lines.append(f"| {name} | {kind} | {label[support.how]} | {support.note} |")
    return "\n".join(lines) + "\n"
