"""HF checkpoints in and out: every source format, sharded bf16/fp16, round trips, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, SiglipVisionModel

from pivot_mega.convert.hf import export_hf, import_hf
from pivot_mega.models import CheckpointError, VisionLanguageModel
from pivot_mega.models.checkpoint_files import read_safetensors_dir
from pivot_mega.models.checkpoint_io import read_checkpoint
from tests.hf_models import (CASES, Case, make_llava, make_qwen2, make_siglip, mllm_inputs, record, rel_err,
                             write_tokenizer_json)

TOL = 1e-5
CASE = CASES[0]


def _logits_err(ckpt, hf, case, seed):
    model = VisionLanguageModel.from_checkpoint(ckpt).float().eval()
    ids, pixels = mllm_inputs(case, seed, images_per_row=(2, 1))
    with torch.no_grad():
        return rel_err(model(ids, pixels), hf.float()(input_ids=ids, pixel_values=pixels).logits)


def _current_layout(state: dict) -> dict:
    """HF LLaVA legacy keys (what save_pretrained writes) → the current in-memory layout."""
    renamed = {}
    for key, value in state.items():
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if key.startswith(old):
                renamed[new + key.removeprefix(old)] = value
                break
    return renamed


def _reference_layout(hf_dir, out, case):
    """An HF LLaVA dir rewritten as a LLaVA-NeXT/PIVOT training checkpoint (last ViT layer deleted)."""
    state = read_safetensors_dir(hf_dir)
    last = case.vision_layers - 1
    ref = {}
    for key, value in state.items():
        if key.startswith(f"vision_tower.encoder.layers.{last}."):
            continue
        if key.startswith("vision_tower."):
            ref["model.vision_tower.vision_tower.vision_model." + key.removeprefix("vision_tower.")] = value
        elif key.startswith("multi_modal_projector.linear_1."):
            ref["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("multi_modal_projector.linear_2."):
            ref["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("language_model.model."):
            ref["model." + key.removeprefix("language_model.model.")] = value
        elif key == "language_model.lm_head.weight":
            ref["lm_head.weight"] = value
    ref["model.image_newline"] = torch.randn(case.hidden)
    out.mkdir()
    save_file(ref, out / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((hf_dir / "config.json").read_text())["text_config"]
    config = {**text, "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen",
              "mm_vision_tower": "google/siglip2-tiny", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_hidden_size": case.vision_hidden, "image_aspect_ratio": "square"}
    (out / "config.json").write_text(json.dumps(config))
    write_tokenizer_json(out, "<image>", case.image_token_id)


@pytest.mark.parametrize("case", [CASE, CASES[1]], ids=lambda c: c.name)
def test_llava_both_key_layouts_and_round_trip(case, tmp_path, seed):
    hf = make_llava(case, seed)
    hf.save_pretrained(tmp_path / "legacy")
    (tmp_path / "current").mkdir()
    save_file(_current_layout(read_safetensors_dir(tmp_path / "legacy")), tmp_path / "current" / "model.safetensors")
    shutil.copy(tmp_path / "legacy" / "config.json", tmp_path / "current" / "config.json")

    import_hf(tmp_path / "a", llava=tmp_path / "legacy")
    import_hf(tmp_path / "b", llava=tmp_path / "current")
    _, tensors_a, unused_a = read_checkpoint(tmp_path / "a")
    _, tensors_b, unused_b = read_checkpoint(tmp_path / "b")
    assert tensors_a.keys() == tensors_b.keys() and unused_a.keys() == unused_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    # The layers past the feature layer and the post-layernorm are kept, not dropped.
    assert any(k.startswith("encoder.layers.") for k in unused_a) and "post_layernorm.weight" in unused_a

    err = _logits_err(tmp_path / "a", hf, case, seed)
    record("import_llava_logits", case.name, err)
    assert err <= TOL

    # export -> import -> export is bitwise identical; the export loads in transformers and matches.
    export_hf(tmp_path / "a", tmp_path / "export1", format="llava")
    import_hf(tmp_path / "c", llava=tmp_path / "export1")
    export_hf(tmp_path / "c", tmp_path / "export2", format="llava")
    first, second = load_file(tmp_path / "export1" / "model.safetensors"), load_file(
        tmp_path / "export2" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    assert (tmp_path / "export1" / "config.json").read_text() == (tmp_path / "export2" / "config.json").read_text()
    assert first.keys() == load_file(tmp_path / "legacy" / "model.safetensors").keys()

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export1", attn_implementation="eager").eval()
    ids, pixels = mllm_inputs(case, seed + 7, images_per_row=(1, 2))
    with torch.no_grad():
        ours = VisionLanguageModel.from_checkpoint(tmp_path / "a").eval()(ids, pixels)
        err = rel_err(ours, reloaded(input_ids=ids, pixel_values=pixels).logits)
        original = rel_err(hf(input_ids=ids, pixel_values=pixels).logits,
                           reloaded(input_ids=ids, pixel_values=pixels).logits)
    record("exported_llava_logits", case.name, err)
    assert err <= TOL
    assert original == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_precision_llava_keeps_dtype(dtype, tmp_path, seed):
    hf = make_llava(CASE, seed).to(dtype)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "ckpt", llava=tmp_path / "hf", max_shard_bytes=20_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    _, tensors, _ = read_checkpoint(tmp_path / "ckpt")
    assert {t.dtype for t in tensors.values()} == {dtype}
    source = read_safetensors_dir(tmp_path / "hf")
    assert torch.equal(tensors["language.layers.1.mlp.up_proj.weight"],
                       source["language_model.model.layers.1.mlp.up_proj.weight"])
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt")
    assert model.language.embed_tokens.weight.dtype == dtype
    export_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=20_000)
    exported = read_safetensors_dir(tmp_path / "out")
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[k], source[k]) for k in source)
    # fp32 import from the same source: --dtype casts.
    import_hf(tmp_path / "ckpt32", llava=tmp_path / "hf", dtype=torch.float32)
    assert {t.dtype for t in read_checkpoint(tmp_path / "ckpt32")[1].values()} == {torch.float32}


def test_vision_plus_llm_fresh_projector(tmp_path, seed):
    case = CASES[1]
    make_siglip(case, seed).save_pretrained(tmp_path / "siglip")
    qwen = make_qwen2(case, seed)
    qwen.save_pretrained(tmp_path / "qwen")
    with pytest.raises(CheckpointError, match="--image-token-id"):
        import_hf(tmp_path / "x", vision=tmp_path / "siglip", llm=tmp_path / "qwen")
    write_tokenizer_json(tmp_path / "qwen", "<|image_pad|>", case.image_token_id)
    import_hf(tmp_path / "a", vision=tmp_path / "siglip", llm=tmp_path / "qwen", seed=1)
    import_hf(tmp_path / "b", vision=tmp_path / "siglip", llm=tmp_path / "qwen", seed=1)
    import_hf(tmp_path / "c", vision=tmp_path / "siglip", llm=tmp_path / "qwen", seed=2)
    config, a, _ = read_checkpoint(tmp_path / "a")
    _, b, _ = read_checkpoint(tmp_path / "b")
    _, c, _ = read_checkpoint(tmp_path / "c")
    assert config.image_token_id == case.image_token_id
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert torch.equal(a["projector.linear_1.weight"], b["projector.linear_1.weight"])
    assert not torch.equal(a["projector.linear_1.weight"], c["projector.linear_1.weight"])
    bound = 1 / case.vision_hidden ** 0.5
    assert a["projector.linear_1.weight"].abs().max() <= bound and a["projector.linear_1.weight"].std() > bound / 4


def test_full_two_tower_siglip_dir(tmp_path, seed):
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

    from tests.hf_models import vision_config

    torch.manual_seed(seed)
    two_tower = SiglipModel(SiglipConfig(text_config=SiglipTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50),
        vision_config=vision_config(CASE).to_dict())).eval()
    two_tower.save_pretrained(tmp_path / "siglip")
    make_qwen2(CASE, seed).save_pretrained(tmp_path / "qwen")
    import_hf(tmp_path / "ckpt", vision=tmp_path / "siglip", llm=tmp_path / "qwen", image_token_id=CASE.image_token_id)
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt").eval()
    pixels = torch.randn(2, 3, CASE.image_size, CASE.image_size)
    with torch.no_grad():
        theirs = two_tower.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
        assert rel_err(model.vision(pixels), theirs) <= TOL


def test_llava_next_reference_checkpoint(tmp_path, seed, caplog):
    hf = make_llava(CASE, seed)
    hf.save_pretrained(tmp_path / "llava")
    _reference_layout(tmp_path / "llava", tmp_path / "ref", CASE)
    with pytest.raises(CheckpointError, match="--vision-config"):
        import_hf(tmp_path / "x", llava_next=tmp_path / "ref")
    # The tower shape from an HF SigLIP config.json ...
    (tmp_path / "siglip.json").write_text(json.dumps(hf.config.vision_config.to_dict()))
    with caplog.at_level("INFO"):
        import_hf(tmp_path / "a", llava_next=tmp_path / "ref", vision_config=tmp_path / "siglip.json")
    assert "not imported: model.image_newline" in caplog.text
    # ... or from one of our YAML presets.
    v = hf.config.vision_config
    (tmp_path / "siglip.yaml").write_text(
        f"hidden_size: {v.hidden_size}\nintermediate_size: {v.intermediate_size}\nnum_hidden_layers: "
        f"{v.num_hidden_layers}\nnum_attention_heads: {v.num_attention_heads}\nimage_size: {v.image_size}\n"
        f"patch_size: {v.patch_size}\nlayer_norm_eps: 1e-6\n")
    import_hf(tmp_path / "b", llava_next=tmp_path / "ref", vision_config=tmp_path / "siglip.yaml")
    config, a, unused = read_checkpoint(tmp_path / "a")
    _, b, _ = read_checkpoint(tmp_path / "b")
    assert config.vision.select_layer == -2 and config.image_token_id == CASE.image_token_id
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(unused) == {"post_layernorm.weight", "post_layernorm.bias"}
    err = _logits_err(tmp_path / "a", hf, CASE, seed)
    record("import_llava_next_logits", CASE.name, err)
    assert err <= TOL
    # Exported without the deleted layer: feature layer -1 of a one-layer-shorter tower, same logits.
    export_hf(tmp_path / "a", tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["vision_feature_layer"] == -1
    assert exported["vision_config"]["num_hidden_layers"] == CASE.vision_layers - 1
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert _logits_err(tmp_path / "a", reloaded, CASE, seed) <= TOL


def test_siglip_export_is_the_whole_encoder(tmp_path, seed):
    hf = make_llava(CASE, seed)
    hf.save_pretrained(tmp_path / "llava")
    import_hf(tmp_path / "ckpt", llava=tmp_path / "llava")
    export_hf(tmp_path / "ckpt", tmp_path / "siglip", format="siglip")
    encoder = SiglipVisionModel.from_pretrained(tmp_path / "siglip", attn_implementation="eager").eval()
    assert encoder.config.num_hidden_layers == CASE.vision_layers
    original = hf.model.vision_tower.state_dict()
    assert encoder.state_dict().keys() == original.keys()
    assert all(torch.equal(encoder.state_dict()[k], original[k]) for k in original)
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt").eval()
    pixels = torch.randn(2, 3, CASE.image_size, CASE.image_size)
    with torch.no_grad():
        err = rel_err(model.vision(pixels), encoder(pixels, output_hidden_states=True).hidden_states[-2])
    record("exported_siglip_features", CASE.name, err)
    assert err <= TOL
    assert json.loads((tmp_path / "siglip" / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3


def test_fresh_model_export_loads_in_transformers(tmp_path, seed):
    """A model built from a config (no unused layers) exports with feature layer -1 and matches."""
    from pivot_mega.models.checkpoint_io import save_model
    from tests.hf_models import tiny_model

    model, case = tiny_model(seed)
    save_model(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids, pixels = mllm_inputs(case, seed)
    with torch.no_grad():
        assert rel_err(model(ids, pixels), reloaded(input_ids=ids, pixel_values=pixels).logits) <= TOL


def _qwen_like_tokenizer(directory):
    """A byte-level BPE with Qwen2.5's special tokens only (no ``<image>``), saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                  "<|image_pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["what is in this image? a cat on a mat."] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(directory)
    return directory


def _token_id(directory, text):
    import json
    data = json.loads((directory / "tokenizer.json").read_text())
    return next(t["id"] for t in data["added_tokens"] if t["content"] == text)


def test_llava_export_runs_through_autoprocessor(tmp_path, seed):
    """lmms-eval's path: AutoProcessor expands ``<image>`` and the exported model gives our logits."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from pivot_mega.config import load_model_config
    from pivot_mega.models import VisionLanguageModel
    from pivot_mega.models.checkpoint_io import save_model
    from pivot_mega.presets import model_preset_path
    tokenizer = _qwen_like_tokenizer(tmp_path / "tok")
    config = load_model_config(model_preset_path("tiny"), [f"image_token_id={_token_id(tokenizer, '<|image_pad|>')}"])
    model = VisionLanguageModel(config).init_weights(seed).eval()
    save_model(model, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "ckpt" / name).write_bytes((tokenizer / name).read_bytes())
    export_hf(tmp_path / "ckpt", tmp_path / "hf")

    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    inputs = processor(text="<image>\nwhat is in this image?", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == config.num_image_tokens
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["pixel_values"])
        theirs = reloaded(**inputs).logits
    assert rel_err(ours, theirs) <= TOL
    # The pixels the processor makes are those our loader makes (SigLIP resize + normalisation).
    from pivot_mega.data.images import make_image_decoder
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = make_image_decoder("python", image_size=config.vision.image_size, num_threads=1)([buffer.getvalue()])
    assert float((pixels - inputs["pixel_values"]).abs().max()) <= 2 / 127.5


# ----------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def llava_dir(tmp_path, seed):
    make_llava(CASE, seed).save_pretrained(tmp_path / "llava")
    return tmp_path / "llava"


def _edit_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


def test_missing_extra_and_misshaped_tensors_are_named(llava_dir, tmp_path):
    key = "language_model.model.layers.1.self_attn.k_proj.bias"
    _edit_weights(llava_dir, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"missing tensor language\.layers\.1\.self_attn\.k_proj\.bias "
                                              r"\(expected shape \[16\]\)"):
        import_hf(tmp_path / "x", llava=llava_dir)
    _edit_weights(llava_dir, lambda s: s.update({key: torch.randn(17), "language_model.model.extra.weight":
                                                 torch.randn(3)}))
    with pytest.raises(CheckpointError) as info:
        import_hf(tmp_path / "x", llava=llava_dir)
    message = str(info.value)
    assert f"tensor {key} (-> language.layers.1.self_attn.k_proj.bias) has shape [17], the config expects [16]" \
        in message
    assert "unexpected tensor language_model.model.extra.weight (-> language.extra.weight) with shape [3]" in message


def test_config_mismatch_names_both_shapes(llava_dir, tmp_path):
    config = json.loads((llava_dir / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 90
    (llava_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight .* has shape \[88, 48\], "
                                              r"the config expects \[90, 48\]"):
        import_hf(tmp_path / "x", llava=llava_dir)


def test_unknown_architectures_are_refused(llava_dir, tmp_path):
    config = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    with pytest.raises(CheckpointError, match="model_type 'llava_next' is not an HF LLaVA"):
        import_hf(tmp_path / "x", llava=llava_dir)
    config["text_config"]["model_type"] = "llama"
    (llava_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="language model_type 'llama' is not supported"):
        import_hf(tmp_path / "x", llava=llava_dir)
    config["text_config"]["model_type"] = "qwen2"
    config["vision_feature_select_strategy"] = "default"
    (llava_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="select_strategy 'default'"):
        import_hf(tmp_path / "x", llava=llava_dir)


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle files \['pytorch_model.bin'\], which are never loaded"):
        read_safetensors_dir(tmp_path / "old")


def test_not_a_checkpoint_and_one_source_only(llava_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not a pivot_mega checkpoint"):
        VisionLanguageModel.from_checkpoint(llava_dir)
    with pytest.raises(CheckpointError, match="exactly one source"):
        import_hf(tmp_path / "x", llava=llava_dir, vision=llava_dir, llm=llava_dir)


def test_tied_head_that_differs_is_refused(tmp_path, seed):
    qwen = make_qwen2(Case("t", tie=False), seed)
    qwen.save_pretrained(tmp_path / "qwen")
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    make_siglip(CASE, seed).save_pretrained(tmp_path / "siglip")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from embed_tokens.weight"):
        import_hf(tmp_path / "x", vision=tmp_path / "siglip", llm=tmp_path / "qwen", image_token_id=3)
