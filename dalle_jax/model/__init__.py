"""The stage-2 transformer: config, masks, model, loss."""

from dalle_jax.model.config import CONFIG_NAMES, DalleConfig, dalle_attention_pattern, get_config
from dalle_jax.model.loss import cross_entropy, drop_captions, loss_fn
from dalle_jax.model.masks import attention_mask, layer_mask
from dalle_jax.model.transformer import KV_CACHE_AXES, DalleTransformer, KVCache

__all__ = [
    "CONFIG_NAMES",
    "DalleConfig",
    "DalleTransformer",
    "KVCache",
    "KV_CACHE_AXES",
    "attention_mask",
    "cross_entropy",
    "dalle_attention_pattern",
    "drop_captions",
    "get_config",
    "layer_mask",
    "loss_fn",
]
