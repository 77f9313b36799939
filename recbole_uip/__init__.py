"""recbole-uip: latent user profiles inferred by a frozen LLM (UserIP-Tuning), served to RecBole as features.

Entry points: ``run_recbole_uip`` (train and test a RecBole model with or without profiles) and
``infer_profiles`` (the preprocessing step alone). See README.md.
"""

import warnings

# RecBole 1.2.1 imports ray, which imports pkg_resources; and it calls pandas' chained fillna(inplace=True),
# which works on the pinned pandas<3 but warns on every dataset load. Neither is actionable for our users.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")

__version__ = "0.1.0"

__all__ = ["run_recbole_uip", "infer_profiles", "load_data_and_model", "FeatureBank", "__version__"]


def __getattr__(name):
    if name in ("run_recbole_uip", "infer_profiles", "load_data_and_model"):
        from recbole_uip import quick_start

        return getattr(quick_start, name)
    if name == "FeatureBank":
        from recbole_uip.bank import FeatureBank

        return FeatureBank
    raise AttributeError(name)
