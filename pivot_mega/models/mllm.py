"""The MLLM: SigLIP tower → mlp2x_gelu projector → image features spliced into Qwen2's embeddings."""

from __future__ import annotations

import math
import os
import zlib

import torch
from torch import nn

from ..config import ModelConfig
from ..profiling import nvtx_range
from ..batch import PackedSeqs
from .projector import Projector
from .qwen2 import Qwen2LanguageModel
from .siglip import SiglipVisionTower


class ImageTokenMismatchError(ValueError):
    """input_ids hold a different number of image tokens than the images provide."""


class VisionLanguageModel(nn.Module):
    """LLaVA-style MLLM; a plain nn.Module (parallelism is applied from outside).

    Submodules: ``vision`` (SigLIP up to the selected layer), ``projector``, ``language`` (Qwen2).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.vision = SiglipVisionTower(config.vision, attention_backend=config.attention)
        self.projector = Projector(config.projector, config.vision.hidden_size, config.language.hidden_size)
        self.language = Qwen2LanguageModel(config.language, attention_backend=config.attention)

    # ------------------------------------------------------------------------------------------
    # forward pieces (pipeline stages call these separately)

    def encode_images(self, pixel_values: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values ``[N_img, 3, H, W]`` → projected features ``[N_img, T, H_llm]``.

        With ``image_index`` (int64 ``[N_runs]``), ``pixel_values`` holds distinct images and run k of
        image tokens shows image ``image_index[k]``: each image is encoded once however often it is
        shown (a DPO pair's chosen and rejected sequences share theirs), and its gradient is the sum
        over its uses. → ``[N_runs, T, H_llm]``.
        """
        with nvtx_range("vision_encode"):
            patches = self.vision(pixel_values)
        with nvtx_range("projector"):
            features = self.projector(patches)
        return features if image_index is None else features[image_index]

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[B, S, H]`` with image features written over the image-token positions."""
        return embed_with_images(self.language.embed_tokens, input_ids, image_features, self.config)

    def forward(self, inputs: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                packed: PackedSeqs | None = None, image_index: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids ``[B, S]`` (each image's placeholder expanded to ``num_image_tokens`` copies of
        ``image_token_id``), pixel_values ``[N_img, 3, H, W]`` → logits ``[B, S, V]`` (or the
        final-normed hidden states ``[B, S, H]`` with ``return_hidden``).

        ``packed``: the layout of packed rows (who attends to whom, positions), as the loader made it;
        None: one causal sequence per row. ``image_index``: see :meth:`encode_images`.

        A pipeline stage is this model with the parts it does not hold set to None: a later stage
        gets the previous stage's hidden states (floating point) as ``inputs`` and passes them on
        through its layers; only the stage with the final norm normalises, and ``return_hidden``
        is implied where there is no head.
        """
        if inputs.is_floating_point():
            hidden = inputs
        else:
            features = self.encode_images(pixel_values, image_index) if pixel_values is not None else None
            hidden = self.embed(inputs, features)
        with nvtx_range("llm_forward"):
            hidden = self.language.forward_hidden(hidden, packed)
        return hidden if return_hidden or self.language.norm is None else self.language.logits(hidden)

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", **config_overrides) -> "VisionLanguageModel":
        """Loads a pivot_mega checkpoint directory (``pivot-mega convert import-hf`` writes one).

        ``dtype=None`` keeps the stored dtype; ``config_overrides`` set run-time fields (``attention``...).
        """
        # checkpoint_files knows no model class (it is given this one), so it never imports this module.
        from .checkpoint_files import build_model

        return build_model(cls, path, dtype=dtype, device=device, **config_overrides)

    def init_weights(self, seed: int = 0) -> "VisionLanguageModel":
        """Random init; see ``init_parameters``."""
        init_parameters(self, seed)
        return self


def embed_with_images(embed_tokens: nn.Module, input_ids: torch.Tensor, image_features: torch.Tensor | None,
                      config: ModelConfig) -> torch.Tensor:
    """Token embeddings ``[B, S, H]`` with ``image_features [N_img, T, H]`` written over the image tokens.

    Images fill image-token positions in reading order (row by row, left to right).
    """
    embeds = embed_tokens(input_ids)
    is_image = input_ids == config.image_token_id
    num_slots = int(is_image.sum())
    num_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
    if num_slots != num_features:
        images = 0 if image_features is None else image_features.shape[0]
        per_image = config.num_image_tokens if image_features is None else image_features.shape[1]
        raise ImageTokenMismatchError(
            f"input_ids hold {num_slots} image tokens (id {config.image_token_id}) but "
            f"{images} image(s) x {per_image} tokens = {num_features} features were given; "
            f"each image needs exactly {per_image} image tokens")
    if image_features is None:
        return embeds
    # Scattered even when there are no images (N_img = 0): the vision tower then stays in the autograd
    # graph, so data-parallel ranks run the same collectives whether or not a micro-batch has images.
    features = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return embeds.masked_scatter(is_image[..., None], features)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Random init of every parameter of ``module`` (``prefix`` gives its names in the whole model)."""
    for local_name, param in module.named_parameters():
        param.copy_(initial_value(module, local_name, prefix + local_name, tuple(param.shape), seed))


def initial_value(module: nn.Module, local_name: str, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full initial value of parameter ``name``, drawn from a generator seeded by (seed, name).

    Seeding per name makes the model independent of how parameters are later sharded or which rank
    materialises them. Linear/conv/embedding weights ~ N(0, 0.02), biases 0, norms 1; the projector
    uses PyTorch's default Linear init (U(+-1/sqrt(fan_in))), as LLaVA's fresh projector does.
    """
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    owner, leaf = local_name.rsplit(".", 1)
    if name.startswith("projector."):
        bound = 1.0 / math.sqrt(module.get_submodule(owner).in_features)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    if "norm" in owner:
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, 0.02, generator=gen)
