"""`DalleConfig`: shape and training options of the stage-2 transformer, with named variants.

A config is data: it is saved as JSON beside every checkpoint (`to_dict` / `from_dict`), so a
checkpoint can be loaded without the training config that made it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dalle_jax.errors import UserError

ATTENTION_TYPES = ("full", "row", "column", "conv")
NORM_TYPES = ("layernorm", "rmsnorm")
COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn")
ACTIVATIONS = ("gelu", "relu")

# Rows of the text embedding table are rounded up to a multiple of this, so the table shards
# evenly over any mesh axis of size up to 64 (the extra rows are never looked up).
TEXT_TABLE_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    """The decoder-only transformer over `[text ids (T); image ids (h*w)]`.

    Sequence layout (S = T + h*w positions, see `dalle_jax.model.transformer`):
    position 0 holds a learned text start token, positions 1..T the T text ids, positions
    T+1..S-1 the image ids 0..N-2. The output at position p < T predicts text id p; the output at
    position T + j predicts image id j, so image id 0 is predicted at the last text position.
    """

    text_vocab_size: int = 1000  # ids the tokenizer emits, pad included
    text_length: int = 32  # T: captions are padded / cut to this many ids
    text_pad_id: int = 0
    image_vocab_size: int = 512  # codebook size of the stage-1 vqvae
    image_rows: int = 8  # h: the image id grid is image_rows x image_cols
    image_cols: int = 8  # w
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 8
    mlp_dim: int = 1024
    # RMSNorm and bias-free projections (as in PaLM / LLaMA) rather than DALL-E's LayerNorm and
    # biases: same quality, and measured on this 2-core CPU, ~5 points more of the matmul peak
    # for a ref-small train step (fewer memory-bound passes). Both remain options.
    norm: str = "rmsnorm"
    use_bias: bool = False  # biases in the attention and MLP projections (heads always have one)
    # The MLP's nonlinearity: "relu", or "gelu" (tanh form, as in GPT-2 and DALL-E). On the
    # 2-core CPU a ReLU train step is 1.13x (ref-small) to 1.2x (a 1 M model) as fast, GELU's
    # tanh and its backward being memory-bound passes, and on shapes_world it learned no worse
    # per step (runs/README.md, "activation"). Configs saved before this field existed, the
    # shipped bundles' included, are GELU (`from_dict`).
    activation: str = "relu"
    # Attention pattern of the image-to-image block, cycled over layers (layer i uses
    # attention_types[i % len]). DALL-E: row, column, row, row, ... and "conv" in the last layer
    # (`dalle_attention_pattern`).
    attention_types: tuple[str, ...] = ("full",)
    conv_kernel: int = 11  # side of the causal neighbourhood of "conv" attention
    dropout_rate: float = 0.0  # on embeddings and residual branches; needs a dropout key
    caption_dropout: float = 0.1  # fraction of captions replaced by the empty caption in training
    text_loss_weight: float = 1.0 / 8.0
    image_loss_weight: float = 7.0 / 8.0
    dtype: str = "float32"  # compute dtype; parameters, logits and losses stay float32
    # The training forward pass's attention kernel: "xla" is the einsum attention written in
    # `attention.py` (any device; tuned on CPU); "cudnn" is jax.nn.dot_product_attention's fused
    # cuDNN kernel (NVIDIA GPUs, bfloat16 compute): the [S, S] scores never reach GPU memory.
    # Decoding with a KV cache always uses the einsum path.
    attention_impl: str = "xla"
    remat: bool = False  # rematerialise each block in the backward pass (saves memory on pods)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # Lists arrive from JSON; the dataclass is frozen, so fix the type in place once.
        object.__setattr__(self, "attention_types", tuple(self.attention_types))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def image_length(self) -> int:
        """N = h * w: image ids per example."""
        return self.image_rows * self.image_cols

    @property
    def seq_length(self) -> int:
        """S = T + N: positions the transformer runs over."""
        return self.text_length + self.image_length

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def text_table_rows(self) -> int:
        """Rows of the text embedding table: the vocabulary, one pad embedding per text position,
        the start token, rounded up to `TEXT_TABLE_MULTIPLE`."""
        rows = self.text_vocab_size + self.text_length + 1
        return TEXT_TABLE_MULTIPLE * math.ceil(rows / TEXT_TABLE_MULTIPLE)

    @property
    def text_start_id(self) -> int:
        """Row of the text embedding table used by the start token at position 0."""
        return self.text_vocab_size + self.text_length

    def layer_attention(self, layer: int) -> str:
        return self.attention_types[layer % len(self.attention_types)]

    # ---- checks and serialisation --------------------------------------------------------------
    def validate(self) -> None:
        positive = [
            "text_vocab_size",
            "text_length",
            "image_vocab_size",
            "image_rows",
            "image_cols",
            "num_layers",
            "d_model",
            "num_heads",
            "mlp_dim",
            "conv_kernel",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise UserError(
                f"model config: d_model {self.d_model} is not divisible by num_heads "
                f"{self.num_heads}; pick sizes with d_model = num_heads * head_dim"
            )
        if not 0 <= self.text_pad_id < self.text_vocab_size:
            raise UserError(
                f"model config: text_pad_id {self.text_pad_id} is outside the text vocabulary "
                f"[0, {self.text_vocab_size})"
            )
        if self.image_length < 2:
            raise UserError(
                "model config: the image grid needs at least 2 ids (image_rows*image_cols)"
            )
        if not self.attention_types or any(a not in ATTENTION_TYPES for a in self.attention_types):
            raise UserError(
                f"model config: attention_types {self.attention_types} must be a non-empty list "
                f"of {ATTENTION_TYPES}"
            )
        if self.norm not in NORM_TYPES:
            raise UserError(f"model config: norm {self.norm!r} must be one of {NORM_TYPES}")
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"model config: activation {self.activation!r} must be one of {ACTIVATIONS}"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"model config: dtype {self.dtype!r} must be one of {COMPUTE_DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UserError(
                f"model config: attention_impl {self.attention_impl!r} must be one of "
                f"{ATTENTION_IMPLS}"
            )
        if self.attention_impl == "cudnn" and self.dtype == "float32":
            raise UserError(
                "model config: attention_impl 'cudnn' needs dtype bfloat16 (cuDNN's fused "
                "attention has no float32 kernel); set dtype=bfloat16 or attention_impl=xla"
            )
        for name in ("dropout_rate", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(
                    f"model config: {name} must be in [0, 1), got {getattr(self, name)}"
                )
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise UserError("model config: loss weights must be non-negative")
        if self.text_loss_weight + self.image_loss_weight <= 0:
            raise UserError("model config: text_loss_weight + image_loss_weight must be positive")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["attention_types"] = list(self.attention_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DalleConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"model config: unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        # Configs saved before `activation` existed were all GELU, whatever today's default is.
        return cls(**{"activation": "gelu", **d})

    def replace(self, **changes: Any) -> DalleConfig:
        return dataclasses.replace(self, **changes)


def dalle_attention_pattern(num_layers: int) -> tuple[str, ...]:
    """DALL-E's layer pattern: row, column, row, row, ... and a convolutional last layer."""
    cycle = ("row", "column", "row", "row")
    return tuple(cycle[i % 4] for i in range(num_layers - 1)) + ("conv",)


_VARIANTS: dict[str, DalleConfig] = {
    # Unit tests: a few thousand parameters, a 4x4 image grid.
    "tiny": DalleConfig(
        text_vocab_size=50,
        text_length=8,
        image_vocab_size=32,
        image_rows=4,
        image_cols=4,
        num_layers=2,
        d_model=32,
        num_heads=4,
        mlp_dim=64,
        conv_kernel=3,
    ),
    # shapes_world/64 in a 90-minute CPU recipe (8x8 ids of 512 codes, 24 caption ids): ~1 M
    # parameters, because such a recipe leaves the transformer ~40 minutes, and in a budget that
    # short a smaller model trained for more steps wins (runs/README.md, "shapes/stage2_90min":
    # 1 M parameters for 9,000 steps beat 2 M for 6,000 and 5 M for 3,200).
    "mini": DalleConfig(
        text_vocab_size=1000,
        text_length=24,
        image_vocab_size=512,
        image_rows=8,
        image_cols=8,
        num_layers=4,
        d_model=128,
        num_heads=4,
        mlp_dim=512,
    ),
    # The reference size DALLE-pytorch is benchmarked at on this machine.
    "ref-small": DalleConfig(
        text_vocab_size=1000,
        text_length=32,
        image_vocab_size=512,
        image_rows=8,
        image_cols=8,
        num_layers=4,
        d_model=256,
        num_heads=8,
        mlp_dim=1024,
    ),
    # CPU demo on shapes_world/64 (8x8 ids from a 512-code vqvae): ~5 M matmul parameters,
    # about 3 GFLOP per training example, so roughly 100k examples in an hour on 2 cores.
    "small": DalleConfig(
        text_vocab_size=1000,
        text_length=32,
        image_vocab_size=512,
        image_rows=8,
        image_cols=8,
        num_layers=6,
        d_model=256,
        num_heads=8,
        mlp_dim=1024,
    ),
    "ref-base": DalleConfig(
        text_vocab_size=16384,
        text_length=64,
        image_vocab_size=8192,
        image_rows=16,
        image_cols=16,
        num_layers=12,
        d_model=768,
        num_heads=12,
        mlp_dim=3072,
    ),
    # Pods: bfloat16 compute, remat, DALL-E's sparse pattern.
    "350m": DalleConfig(
        text_vocab_size=16384,
        text_length=64,
        image_vocab_size=16384,
        image_rows=16,
        image_cols=16,
        num_layers=24,
        d_model=1024,
        num_heads=16,
        mlp_dim=4096,
        dtype="bfloat16",
        remat=True,
    ),
    "1b": DalleConfig(
        text_vocab_size=16384,
        text_length=128,
        image_vocab_size=8192,
        image_rows=32,
        image_cols=32,
        num_layers=36,
        d_model=1536,
        num_heads=24,
        mlp_dim=6144,
        attention_types=dalle_attention_pattern(36),
        dtype="bfloat16",
        remat=True,
    ),
}

CONFIG_NAMES = tuple(_VARIANTS)


def get_config(name: str, **overrides: Any) -> DalleConfig:
    """A named variant (`tiny`, `mini`, `ref-small`, `small`, `ref-base`, ...) + overrides."""
    if name not in _VARIANTS:
        raise UserError(f"unknown model config {name!r}; choose one of {', '.join(CONFIG_NAMES)}")
    return dataclasses.replace(_VARIANTS[name], **overrides) if overrides else _VARIANTS[name]
