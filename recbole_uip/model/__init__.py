"""Profile fusion: lets RecBole's sequential and general models consume the ``uip_*`` profile IDs."""

from recbole_uip.model.fusion import (  # noqa: F401
    MODEL_SUPPORT, ModelSupport, ProfilesNotSupportedError, model_support, model_class_for_run, with_profiles,
)
from recbole_uip.model.profile_embedding import ProfileFusedEmbedding, UserProfileEmbedding  # noqa: F401
