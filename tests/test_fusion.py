"""Profile fusion for sequential and general models: every model marked supported learns from the profile IDs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_dataset
from recbole_uip.model.fusion import (
    MODEL_SUPPORT, NATIVE, SEQUENCE_OUTPUT, UNSUPPORTED, USER_EMBEDDING, ProfilesNotSupportedError, model_class_for_run,
    with_profiles,
)
from recbole_uip.model.profile_embedding import ProfileFusedEmbedding, UserProfileEmbedding

FIELDS = ["uip_hobby", "uip_background"]
FUSED = sorted(name for name, s in MODEL_SUPPORT.items() if s.how in (USER_EMBEDDING, SEQUENCE_OUTPUT))

# Model settings only needed to make some models run at all on 24 users (or to keep them CI-sized).
MODEL_OVERRIDES = {
    "FDSA": {"selected_features": ["class"]},
    "SASRecF": {"selected_features": ["class"]},
    "GRU4RecF": {"selected_features": ["class"]},
    "SINE": {"interest_size": 2},
    "Caser": {"MAX_ITEM_LIST_LENGTH": 5},
    "HGN": {"MAX_ITEM_LIST_LENGTH": 5},
    "NNCF": {"neigh_info_method": "random"},
    "DGCF": {"n_factors": 2, "embedding_size": 8},
    "NCL": {"num_clusters": 4},
    "ConvNCF": {"embedding_size": 8, "cnn_channels": [1, 8, 8, 8], "cnn_kernels": [2, 2, 2], "cnn_strides": [2, 2, 2]},
}


def write_profile_dataset(root: Path, name: str = "toy") -> Path:
    """The toy dataset with two profile token columns in ``.user`` (as an augmented copy would have)."""
    folder = write_dataset(root, name)
    user_file = folder / f"{name}.user"
    lines = user_file.read_text().splitlines()
    rows = [lines[0] + "\tuip_hobby:token\tuip_background:token"]
    for line in lines[1:]:
        user = int(line.split("\t")[0])
        rows.append(f"{line}\t{user % 3}\t{'none' if user == 1 else user % 2}")
    user_file.write_text("\n".join(rows) + "\n")
    return folder


def _config(model: str, tmp_path: Path, **overrides):
    from recbole.utils import ModelType

    from recbole_uip.compat import resolve_model_class
    from recbole_uip.quick_start import build_config

    config_dict = {
        "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"), "uip": True,
        "use_gpu": False, "show_progress": False, "state": "WARNING", "seed": 7, "epochs": 1,
        "train_batch_size": 64, "eval_batch_size": 256, "embedding_size": 16, "hidden_size": 16,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "user": ["user_id", *FIELDS],
                     "item": ["item_id", "class"]},
    }
    if resolve_model_class(model).type == ModelType.SEQUENTIAL:
        config_dict.update(eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
                           MAX_ITEM_LIST_LENGTH=8)
    config_dict.update(MODEL_OVERRIDES.get(model, {}))
    config_dict.update(overrides)
    return build_config(model, "toy", None, config_dict)


def _build(model: str, tmp_path: Path, **overrides):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    write_profile_dataset(tmp_path / "data")
    config = _config(model, tmp_path, **overrides)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model_obj = model_class_for_run(config)(config, train._dataset)
    return config, model_obj, train, test


def _scores(model, config, interaction, n_items: int) -> torch.Tensor:
    """``(B, n_items)`` scores of the batch's users, by full sort where the model has it, else by predict."""
    model.eval()
    for cache in ("restore_user_e", "restore_item_e"):          # graph models cache propagated embeddings
        if getattr(model, cache, None) is not None:
            setattr(model, cache, None)
    with torch.no_grad():
        try:
            return model.full_sort_predict(interaction).view(len(interaction), -1)
        except NotImplementedError:
            batch = interaction.repeat_interleave(n_items)
            batch.update(type(interaction)({config["ITEM_ID_FIELD"]: torch.arange(n_items).repeat(len(interaction))}))
            return model.predict(batch).view(len(interaction), -1)


@pytest.mark.parametrize("model_name", FUSED)
def test_fused_model_learns_from_profile_ids(model_name, tmp_path):
    """The profile tables receive gradient, and changing one user's profile ID changes that user's scores."""
    config, model, train, test = _build(model_name, tmp_path)
    profile_modules = list(model.profile_embeddings())
    assert profile_modules, "no profile embedding was installed"
    if MODEL_SUPPORT[model_name].how == USER_EMBEDDING:
        for name in MODEL_SUPPORT[model_name].user_tables:
            assert isinstance(getattr(model, name), ProfileFusedEmbedding)

    model.train()
    if hasattr(model, "e_step"):                     # NCL: its trainer clusters the embeddings before training
        model.e_step()
    batch = next(iter(train))
    loss = model.calculate_loss(batch)
    loss = sum(loss) if isinstance(loss, tuple) else loss
    loss.backward()
    grads = [table.weight.grad for m in profile_modules for table in m.tables]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "profile tables got no gradient"

    interaction = next(iter(test))[0]
    n_items = train._dataset.item_num
    before = _scores(model, config, interaction, n_items)
    assert torch.equal(before, _scores(model, config, interaction, n_items)), "scoring is not deterministic"
    user = interaction[config["USER_ID_FIELD"]][0:1]
    current = profile_modules[0].profile_ids[user]                           # (1, P)
    model.set_user_profile_ids(user, current % 2 + 1)                        # another real (non-padding) ID
    assert not torch.equal(profile_modules[0].profile_ids[user], current)
    after = _scores(model, config, interaction, n_items)
    assert not torch.equal(before[0], after[0]), "changing the user's profile ID left the scores unchanged"


def test_every_recbole_sequential_and_general_model_is_classified():
    import recbole.model.general_recommender as general
    import recbole.model.sequential_recommender as sequential

    names = {n for module in (general, sequential) for n in dir(module)
             if isinstance(getattr(module, n), type) and n[0].isupper()}
    assert names == set(MODEL_SUPPORT)
    for name, support in MODEL_SUPPORT.items():
        assert support.how in (NATIVE, USER_EMBEDDING, SEQUENCE_OUTPUT, UNSUPPORTED)
        assert support.note, name


def test_unsupported_and_native_models():
    from recbole.model.context_aware_recommender import DeepFM
    from recbole.model.general_recommender import ItemKNN, Pop
    from recbole.model.sequential_recommender import DIEN

    assert with_profiles(DeepFM, FIELDS) is DeepFM
    assert with_profiles(DIEN, FIELDS) is DIEN
    for model in (Pop, ItemKNN):
        with pytest.raises(ProfilesNotSupportedError, match="no trainable user representation|item-item"):
            with_profiles(model, FIELDS)


def test_knowledge_aware_and_unknown_models_get_a_reason():
    from recbole.model.knowledge_aware_recommender import KGAT
    from recbole.utils import ModelType

    from recbole_uip.model.fusion import model_support

    with pytest.raises(ProfilesNotSupportedError, match="knowledge-aware models are not covered"):
        with_profiles(KGAT, FIELDS)
    assert model_support("MyOwnModel", ModelType.GENERAL).how == UNSUPPORTED


def test_derived_class_keeps_the_model_name_and_is_cached():
    from recbole.model.sequential_recommender import SASRec

    fused = with_profiles(SASRec, FIELDS)
    assert fused.__name__ == "SASRec" and issubclass(fused, SASRec) and fused is not SASRec
    assert with_profiles(SASRec, FIELDS) is fused


def test_profile_fields_must_be_loaded(tmp_path):
    with pytest.raises(ValueError, match="has no user field"):
        _build("SASRec", tmp_path, load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]})


def test_user_profile_embedding_shapes_and_padding():
    ids = torch.tensor([[0, 0], [1, 2], [2, 1]])
    embedding = UserProfileEmbedding(ids, [3, 3], dim=4, std=0.1)
    out = embedding(torch.tensor([[1, 2], [0, 1]]))
    assert out.shape == (2, 2, 4)
    assert torch.equal(embedding(torch.tensor([0])), torch.zeros(1, 4))       # padding user: zero vector
    assert torch.allclose(embedding.table()[1], embedding.tables[0].weight[1] + embedding.tables[1].weight[2])
    base = torch.nn.Embedding(3, 4)
    fused = ProfileFusedEmbedding(base, embedding)
    assert torch.allclose(fused.weight, base.weight + embedding.table())
    assert torch.allclose(fused(torch.tensor([2])), fused.weight[2:3])
    with pytest.raises(ValueError, match="rows"):
        ProfileFusedEmbedding(torch.nn.Embedding(5, 4), embedding)


def test_readme_table_matches_the_code():
    from recbole_uip.model.fusion import support_table_markdown

    readme = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text(encoding="utf-8")
    assert support_table_markdown() in readme, "docs/models.md model table is out of date: paste support_table_markdown()"
