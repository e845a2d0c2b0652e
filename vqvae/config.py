"""The model config of stage 1: what a checkpoint needs to rebuild the network.

`VQVAEConfig` is a frozen dataclass saved as JSON beside every checkpoint (`to_dict`/`from_dict`),
with named variants (`get_config(name)`): `tiny` for tests, `shapes64` and `emoji32` sized to train
on a 2-core CPU in about half an hour, `base` and `dalle` for accelerators.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vqvae.errors import VQVAEInputError

QUANTIZERS = ("vq", "gumbel")
DOWNSAMPLE_MODES = ("conv", "avgpool")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Architecture and quantizer of a VQ-VAE / dVAE.

    Level `i` of the encoder and decoder runs at resolution `image_size / 2**i` with
    `base_channels * channel_multipliers[i]` channels, so `channel_multipliers` has one entry per
    level: `log2(downsample_factor) + 1` entries. The id grid is `grid_size x grid_size`.
    """

    name: str = "custom"
    image_size: int = 32
    downsample_factor: int = 4
    base_channels: int = 16
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    num_groups: int = 8
    # "conv": 3x3 stride-2 conv (learned); "avgpool": 2x2 average pooling (cheaper, no weights).
    downsample_mode: str = "conv"
    # "vq": l2-normalised low-dimensional codes, cosine nearest code, straight-through gradients.
    # "gumbel": the DALL-E dVAE, logits over codes relaxed with Gumbel-softmax while training.
    quantizer: str = "vq"
    codebook_size: int = 64
    # VQ: the dimension codes are compared in (8-32 keeps usage high). Gumbel: embedding width.
    code_dim: int = 8
    # VQ only: codebook moved by an exponential moving average of assigned features instead of
    # by gradients of a codebook loss.
    use_ema: bool = False
    ema_decay: float = 0.99
    # VQ only: a code unused for this many consecutive train steps is re-initialised from a random
    # encoder output of the current batch. 0 disables restarts.
    restart_unused_steps: int = 0
    # The decoder predicts a logit-Laplace distribution per pixel (6 output channels, DALL-E)
    # instead of the pixel values themselves (3 channels).
    logit_laplace: bool = False
    # Dtype of the conv computations; norms, quantizer and losses always run in float32.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # JSON has no tuples; accept a list so `from_dict(json.load(...))` round-trips.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        problems = self._problems()
        if problems:
            raise VQVAEInputError(f"invalid VQVAEConfig {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        f = self.downsample_factor
        if f < 1 or f & (f - 1):
            problems.append(f"downsample_factor must be a power of two (4, 8, 16), got {f}")
        elif len(self.channel_multipliers) != self.num_downsamples + 1:
            problems.append(
                "channel_multipliers needs log2(downsample_factor) + 1 = "
                f"{self.num_downsamples + 1} entries for downsample_factor {f}, "
                f"got {len(self.channel_multipliers)}"
            )
        elif self.image_size % f:
            problems.append(f"image_size {self.image_size} is not a multiple of {f}")
        for mult in self.channel_multipliers:
            if (self.base_channels * mult) % self.num_groups:
                problems.append(
                    f"num_groups {self.num_groups} must divide every level's channels "
                    f"({self.base_channels} * {mult})"
                )
                break
        if self.quantizer not in QUANTIZERS:
            problems.append(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.downsample_mode not in DOWNSAMPLE_MODES:
            problems.append(
                f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {self.downsample_mode!r}"
            )
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.codebook_size < 2:
            problems.append(f"codebook_size must be at least 2, got {self.codebook_size}")
        if self.code_dim < 1:
            problems.append(f"code_dim must be positive, got {self.code_dim}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.restart_unused_steps < 0:
            problems.append(f"restart_unused_steps must be >= 0, got {self.restart_unused_steps}")
        if self.quantizer == "gumbel" and (self.use_ema or self.restart_unused_steps):
            problems.append("use_ema and restart_unused_steps apply to the 'vq' quantizer only")
        return problems

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.downsample_factor))

    @property
    def grid_size(self) -> int:
        """Side of the id grid: ids are `[B, grid_size, grid_size]`."""
        return self.image_size // self.downsample_factor

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def output_channels(self) -> int:
        return 6 if self.logit_laplace else 3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["channel_multipliers"] = list(self.channel_multipliers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQVAEConfig:
        """The inverse of `to_dict`; unknown keys are an error (a config from a newer version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VQVAEInputError(
                f"unknown VQVAEConfig fields {unknown}; known fields: {sorted(known)}"
            )
        return cls(**d)


CONFIGS: dict[str, VQVAEConfig] = {
    c.name: c
    for c in [
        # Tests: 32 px -> 8x8 ids, a few channels, a small codebook.
        VQVAEConfig(
            name="tiny",
            image_size=32,
            downsample_factor=4,
            base_channels=8,
            channel_multipliers=(1, 2, 2),
            num_res_blocks=1,
            num_groups=4,
            quantizer="vq",
            codebook_size=32,
            code_dim=8,
            use_ema=True,
            restart_unused_steps=20,
        ),
        VQVAEConfig(
            name="tiny_gumbel",
            image_size=32,
            downsample_factor=4,
            base_channels=8,
            channel_multipliers=(1, 2, 2),
            num_res_blocks=1,
            num_groups=4,
            quantizer="gumbel",
            codebook_size=32,
            code_dim=16,
        ),
        # shapes_world/64: 64 px -> 8x8 ids over 512 codes. Narrow at full resolution (16 channels)
        # because the 64x64 levels dominate the cost on a CPU.
        VQVAEConfig(
            name="shapes64",
            image_size=64,
            downsample_factor=8,
            base_channels=16,
            channel_multipliers=(1, 2, 4, 4),
            num_res_blocks=1,
            num_groups=8,
            quantizer="vq",
            codebook_size=512,
            code_dim=16,
            use_ema=True,
            ema_decay=0.99,
            restart_unused_steps=100,
        ),
        VQVAEConfig(
            name="shapes64_gumbel",
            image_size=64,
            downsample_factor=8,
            base_channels=16,
            channel_multipliers=(1, 2, 4, 4),
            num_res_blocks=1,
            num_groups=8,
            quantizer="gumbel",
            codebook_size=512,
            code_dim=64,
        ),
        # emoji/32: 32 px -> 8x8 ids over 512 codes; emoji have more detail per pixel than shapes.
        VQVAEConfig(
            name="emoji32",
            image_size=32,
            downsample_factor=4,
            base_channels=32,
            channel_multipliers=(1, 2, 2),
            num_res_blocks=1,
            num_groups=8,
            quantizer="vq",
            codebook_size=512,
            code_dim=16,
            use_ema=True,
            ema_decay=0.99,
            restart_unused_steps=100,
        ),
        # Accelerators: 256 px -> 32x32 ids over 8192 codes (DALL-E's grid and vocabulary).
        VQVAEConfig(
            name="base",
            image_size=256,
            downsample_factor=8,
            base_channels=128,
            channel_multipliers=(1, 1, 2, 4),
            num_res_blocks=2,
            num_groups=32,
            quantizer="vq",
            codebook_size=8192,
            code_dim=32,
            use_ema=True,
            ema_decay=0.99,
            restart_unused_steps=200,
            dtype="bfloat16",
        ),
        VQVAEConfig(
            name="dalle",
            image_size=256,
            downsample_factor=8,
            base_channels=128,
            channel_multipliers=(1, 1, 2, 4),
            num_res_blocks=2,
            num_groups=32,
            quantizer="gumbel",
            codebook_size=8192,
            code_dim=128,
            logit_laplace=True,
            dtype="bfloat16",
        ),
    ]
}
# emoji32 with four times the codes (11 bits per 4x4 patch instead of 9): 512 codes were all in
# use (perplexity ~430) and the PSNR had levelled off below 24 dB.
CONFIGS["emoji32_2048"] = dataclasses.replace(
    CONFIGS["emoji32"], name="emoji32_2048", codebook_size=2048
)


def get_config(name: str) -> VQVAEConfig:
    """The named model variant; an unknown name lists the known ones."""
    if name not in CONFIGS:
        raise VQVAEInputError(
            f"unknown vqvae config {name!r}; known configs: {', '.join(sorted(CONFIGS))}"
        )
    return CONFIGS[name]
