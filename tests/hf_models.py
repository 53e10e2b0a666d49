"""Tiny random models for tests: transformers references and our own (built in code; no hub)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from transformers import (LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                          SiglipVisionConfig, SiglipVisionModel)

from pivot_mega.config import LanguageConfig, ModelConfig, VisionConfig
from pivot_mega.models import VisionLanguageModel


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity configuration: SigLIP + Qwen2 shapes and the feature layer."""

    name: str
    vision_hidden: int = 48
    vision_intermediate: int = 100
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    feature_layer: int = -2
    hidden: int = 48
    intermediate: int = 88
    layers: int = 2
    heads: int = 6
    kv_heads: int = 2
    vocab: int = 131
    tie: bool = True
    rope_theta: float = 10000.0

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1


CASES = [
    Case("gqa3-tied"),
    Case("mha-untied-odd", vision_hidden=36, vision_intermediate=70, vision_heads=3, hidden=60, intermediate=97,
         heads=5, kv_heads=5, tie=False, vocab=97, rope_theta=1e6),
    Case("mqa-tied-layer-1", feature_layer=-1, image_size=48, patch_size=16, heads=4, kv_heads=1, hidden=32,
         intermediate=64, layers=3),
    Case("gqa4-untied-layer2", vision_layers=4, feature_layer=2, heads=8, kv_heads=2, hidden=64, tie=False),
]


def vision_config(case: Case) -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=case.vision_hidden, intermediate_size=case.vision_intermediate,
                              num_hidden_layers=case.vision_layers, num_attention_heads=case.vision_heads,
                              image_size=case.image_size, patch_size=case.patch_size, vision_use_head=False,
                              attn_implementation="eager")


def text_config(case: Case) -> Qwen2Config:
    return Qwen2Config(hidden_size=case.hidden, intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                       num_attention_heads=case.heads, num_key_value_heads=case.kv_heads, vocab_size=case.vocab,
                       tie_word_embeddings=case.tie, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": case.rope_theta},
                       max_position_embeddings=512, attn_implementation="eager")


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves biases at 0 and norms at 1; randomise every tensor so all of them matter."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def make_llava(case: Case, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=vision_config(case), text_config=text_config(case),
                         image_token_index=case.image_token_id, vision_feature_layer=case.feature_layer,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu",
                         image_seq_length=case.image_tokens, tie_word_embeddings=case.tie)
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    _perturb(model, seed)
    if case.tie:
        model.tie_weights()
    return model


def make_siglip(case: Case, seed: int) -> SiglipVisionModel:
    torch.manual_seed(seed)
    model = SiglipVisionModel(vision_config(case)).eval()
    _perturb(model, seed)
    return model


def make_qwen2(case: Case, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(text_config(case)).eval()
    _perturb(model, seed)
    if case.tie:
        model.tie_weights()
    return model


def mllm_inputs(case: Case, seed: int, images_per_row=(1, 2), seqlen: int | None = None):
    """input_ids ``[B, S]`` with each image's placeholder expanded, pixel_values ``[N_img, 3, H, W]``."""
    gen = torch.Generator().manual_seed(seed)
    t = case.image_tokens
    seqlen = seqlen or max(images_per_row) * (t + 5) + 7
    ids = torch.randint(0, case.vocab - 1, (len(images_per_row), seqlen), generator=gen)
    for row, count in enumerate(images_per_row):
        start = 2 + row
        for _ in range(count):
            ids[row, start:start + t] = case.image_token_id
            start += t + 3
    pixels = torch.randn(sum(images_per_row), 3, case.image_size, case.image_size, generator=gen)
    return ids, pixels


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| over the whole tensor, in fp64."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def record(test: str, case: str, error: float) -> None:
    """Appends a measured error to $PIVOT_PARITY_REPORT (JSON lines) when set."""
    path = os.environ.get("PIVOT_PARITY_REPORT")
    if path:
        with open(Path(path), "a") as f:
            f.write(json.dumps({"test": test, "case": case, "max_rel_err": error}) + "\n")


def write_tokenizer_json(directory: Path, image_token: str, image_token_id: int) -> None:
    """A minimal tokenizer.json naming the image token (what import-hf reads to find its id)."""
    data = {"version": "1.0", "added_tokens": [
        {"id": image_token_id, "content": image_token, "special": True, "single_word": False,
         "lstrip": False, "rstrip": False, "normalized": False}]}
    (directory / "tokenizer.json").write_text(json.dumps(data))


def tiny_model(seed, attention_backend="sdpa", **overrides):
    """Our MLLM built from a config (no HF involved), every tensor random; → (model, case)."""
    case = Case("tiny", heads=4, kv_heads=2, hidden=32, intermediate=72)
    config = ModelConfig(
        vision=VisionConfig(hidden_size=case.vision_hidden, intermediate_size=case.vision_intermediate,
                            num_hidden_layers=case.vision_layers, num_attention_heads=case.vision_heads,
                            image_size=case.image_size, patch_size=case.patch_size, select_layer=-2),
        language=LanguageConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                                num_hidden_layers=case.layers, num_attention_heads=case.heads,
                                num_key_value_heads=case.kv_heads, rope_theta=case.rope_theta,
                                tie_word_embeddings=False),
        image_token_id=case.image_token_id, attention=attention_backend, **overrides)
    model = VisionLanguageModel(config).init_weights(seed)
    with torch.no_grad():  # norms and biases off their init values so they take part in the check
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval(), case
