"""Transplant: the encoder bit for bit, a fresh seeded projector, the new LLM's weights, named errors."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pivot_mega.cli import main
from pivot_mega.config import LanguageConfig, ModelConfig, VisionConfig
from pivot_mega.convert.hf import export_hf, import_hf
from pivot_mega.convert.transplant import TransplantError, transplant, transplant_siglip
from pivot_mega.models import CheckpointError, VisionLanguageModel
from pivot_mega.models.checkpoint_files import read_safetensors_dir
from pivot_mega.models.checkpoint_io import read_checkpoint, save_model
from tests.hf_models import CASES, Case, make_llava, make_qwen2, mllm_inputs, write_tokenizer_json

SOURCE = CASES[0]            # SigLIP 48d, 3 layers, feature layer -2: one unused layer + post-layernorm
LLM = Case("new-llm", hidden=40, intermediate=72, layers=2, heads=4, kv_heads=2, vocab=89, tie=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pivot_mega checkpoint imported from an HF LLaVA (it has vision_unused.safetensors)."""
    tmp = tmp_path_factory.mktemp("source")
    make_llava(SOURCE, seed=3).save_pretrained(tmp / "llava")
    import_hf(tmp / "ckpt", llava=tmp / "llava")
    assert (tmp / "ckpt" / "vision_unused.safetensors").is_file()
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """An HF Qwen2 directory whose tokenizer.json names <|image_pad|>."""
    path = tmp_path_factory.mktemp("qwen") / "qwen"
    make_qwen2(LLM, seed=5).save_pretrained(path)
    write_tokenizer_json(path, "<|image_pad|>", LLM.image_token_id)
    return path


def _part(tensors, prefix):
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def test_transplant_from_an_hf_qwen2(tmp_path, source, qwen_dir):
    config = transplant(source, qwen_dir, tmp_path / "out", seed=7)
    assert config.image_token_id == LLM.image_token_id
    assert config.language.hidden_size == LLM.hidden and config.vision.hidden_size == SOURCE.vision_hidden
    _, src_tensors, src_unused = read_checkpoint(source)
    out_config, tensors, unused = read_checkpoint(tmp_path / "out")

    # Vision: the source's tensors, bit for bit, and the unused SigLIP tail carried over.
    src_vision, vision = _part(src_tensors, "vision."), _part(tensors, "vision.")
    assert vision.keys() == src_vision.keys()
    for key in vision:
        assert vision[key].dtype == src_vision[key].dtype and torch.equal(vision[key], src_vision[key]), key
    assert unused.keys() == src_unused.keys() and all(torch.equal(unused[k], src_unused[k]) for k in unused)

    # Projector: freshly drawn from the seed (PyTorch's Linear init as initial_value draws it).
    fresh = VisionLanguageModel(out_config).init_weights(7).state_dict()
    projector = _part(tensors, "projector.")
    assert projector.keys() == {"projector.linear_1.weight", "projector.linear_1.bias",
                                "projector.linear_2.weight", "projector.linear_2.bias"}
    for key, value in projector.items():
        assert torch.equal(value, fresh[key]), key
    bound = 1 / SOURCE.vision_hidden ** 0.5
    assert projector["projector.linear_1.weight"].abs().max() <= bound
    transplant(source, qwen_dir, tmp_path / "seed8", seed=8)
    other = read_checkpoint(tmp_path / "seed8")[1]
    assert not torch.equal(other["projector.linear_1.weight"], projector["projector.linear_1.weight"])

    # Language: the HF model's weights under our names.
    hf = load_file(qwen_dir / "model.safetensors")
    language = _part(tensors, "language.")
    assert len(language) == len(hf)
    for key, value in hf.items():
        ours = "language.lm_head.weight" if key == "lm_head.weight" else "language." + key.removeprefix("model.")
        assert torch.equal(language[ours], value), key
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["added_tokens"][0]["id"] == LLM.image_token_id

    # It runs: images in, logits of the new vocabulary out.
    model = VisionLanguageModel.from_checkpoint(tmp_path / "out")
    ids, pixels = mllm_inputs(dataclasses.replace(SOURCE, vocab=LLM.vocab), seed=0, images_per_row=(1,))
    ids[ids == SOURCE.vocab - 1] = LLM.image_token_id
    with torch.no_grad():
        assert model(ids, pixels).shape == (1, ids.shape[1], LLM.vocab)


def test_transplant_from_a_pivot_checkpoint(tmp_path, source):
    config = ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=48, patch_size=16),
        language=LanguageConfig(vocab_size=71, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        image_token_id=70)
    llm = VisionLanguageModel(config).init_weights(11)
    save_model(llm, tmp_path / "llm")
    out = transplant(source, tmp_path / "llm", tmp_path / "out", seed=0)
    assert out.image_token_id == 70 and out.vision.image_size == SOURCE.image_size
    _, tensors, _ = read_checkpoint(tmp_path / "out")
    for key, value in llm.state_dict().items():
        if key.startswith("language."):
            assert torch.equal(tensors[key], value), key
    _, src_tensors, _ = read_checkpoint(source)
    assert all(torch.equal(tensors[k], v) for k, v in _part(src_tensors, "vision.").items())

    # The source's own language tower: everything equal but the projector, drawn afresh.
    transplant(source, source, tmp_path / "self", seed=0)
    _, tensors, _ = read_checkpoint(tmp_path / "self")
    for key, value in src_tensors.items():
        assert torch.equal(tensors[key], value) != key.startswith("projector."), key


def test_siglip_export_of_the_transplant_is_the_sources(tmp_path, source, qwen_dir):
    transplant(source, qwen_dir, tmp_path / "out", seed=1)
    export_hf(source, tmp_path / "siglip_source", format="siglip")
    export_hf(tmp_path / "out", tmp_path / "siglip_transplant", format="siglip")
    transplant_siglip(source, tmp_path / "siglip_direct")
    reference = read_safetensors_dir(tmp_path / "siglip_source")
    assert any(k.startswith("vision_model.encoder.layers.2.") for k in reference)  # the unused layer is there
    for other in ("siglip_transplant", "siglip_direct"):
        tensors = read_safetensors_dir(tmp_path / other)
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[k], reference[k]) for k in reference), other
        for name in ("config.json", "preprocessor_config.json"):
            assert (tmp_path / other / name).read_text() == (tmp_path / "siglip_source" / name).read_text()


def test_command_line(tmp_path, source, qwen_dir, capsys):
    assert main(["transplant", "--vision-from", str(source), "--llm", str(qwen_dir), "--seed", "3",
                 "--out", str(tmp_path / "out")]) == 0
    assert "fresh mlp2x_gelu (seed 3)" in capsys.readouterr().out
    assert main(["transplant", "--vision-from", str(tmp_path / "out"), "--format", "siglip",
                 "--out", str(tmp_path / "siglip")]) == 0
    assert json.loads((tmp_path / "siglip" / "config.json").read_text())["architectures"] == ["SiglipVisionModel"]
    assert main(["transplant", "--vision-from", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "--llm is required" in capsys.readouterr().err


def test_mismatches_are_named_errors(tmp_path, source, qwen_dir):
    # The encoder must come from a pivot_mega checkpoint.
    with pytest.raises(TransplantError, match=f"--vision-from {qwen_dir}: not a pivot_mega checkpoint"):
        transplant(qwen_dir, qwen_dir, tmp_path / "a")
    # The LLM must be a language model.
    export_hf(source, tmp_path / "siglip", format="siglip")
    with pytest.raises(TransplantError, match="model_type 'siglip_vision_model' is not a language model"):
        transplant(source, tmp_path / "siglip", tmp_path / "b")
    # The image token must be in the new vocabulary, and agree with the LLM's tokenizer.
    with pytest.raises(TransplantError, match="marks images with token id 88, but --image-token-id says 5"):
        transplant(source, qwen_dir, tmp_path / "c", image_token_id=5)
    bare = tmp_path / "bare"
    make_qwen2(LLM, seed=5).save_pretrained(bare)
    with pytest.raises(TransplantError, match="image token id 500 .* outside its vocabulary of 89"):
        transplant(source, bare, tmp_path / "d", image_token_id=500)
    with pytest.raises(CheckpointError, match=f"--llm {bare}: cannot tell which token id marks image positions"):
        transplant(source, bare, tmp_path / "e")
    # An image's tokens must fit the LLM's positions.
    short = tmp_path / "short"
    make_qwen2(LLM, seed=5).save_pretrained(short)
    hf_config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**hf_config, "max_position_embeddings": 16}))
    with pytest.raises(TransplantError, match="gives 16 tokens per image .* max_position_embeddings 16"):
        transplant(source, short, tmp_path / "f", image_token_id=3)
    # Dtypes must agree unless cast.
    half = tmp_path / "half"
    make_qwen2(LLM, seed=5).to(torch.bfloat16).save_pretrained(half)
    write_tokenizer_json(half, "<|image_pad|>", LLM.image_token_id)
    with pytest.raises(TransplantError, match="is torch.float32 but the LLM .* is torch.bfloat16; .* --dtype"):
        transplant(source, half, tmp_path / "g")
    transplant(source, half, tmp_path / "g", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in read_checkpoint(tmp_path / "g")[1].values())
    # The unused SigLIP tail must continue the encoder, or its SigLIP export would be broken.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in source.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    unused = load_file(broken / "vision_unused.safetensors")
    unused = {k.replace("encoder.layers.2.", "encoder.layers.5."): v for k, v in unused.items()}
    save_file(unused, broken / "vision_unused.safetensors")
    with pytest.raises(TransplantError, match=r"vision_unused.safetensors: holds encoder layers \[5\], which do not "
                                              r"continue the 2 built layers"):
        transplant(broken, qwen_dir, tmp_path / "h")
