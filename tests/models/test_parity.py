"""Our SigLIP, Qwen2 and MLLM against transformers, fp32, max rel error <= 1e-5 (several configs)."""

import pytest
import torch

from pivot_mega.convert.hf import import_hf
from pivot_mega.models import ImageTokenMismatchError, VisionLanguageModel
from tests.hf_models import CASES, make_llava, make_qwen2, make_siglip, mllm_inputs, record, rel_err, tiny_model

TOL = 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_siglip_and_qwen2_match_transformers(case, tmp_path, seed):
    siglip, qwen = make_siglip(case, seed), make_qwen2(case, seed + 1)
    siglip.save_pretrained(tmp_path / "siglip")
    qwen.save_pretrained(tmp_path / "qwen")
    import_hf(tmp_path / "ckpt", vision=tmp_path / "siglip", llm=tmp_path / "qwen",
              select_layer=case.feature_layer, image_token_id=case.image_token_id)
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt").eval()

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, case.image_size, case.image_size, generator=gen)
    ids = torch.randint(0, case.vocab, (2, 23), generator=gen)
    with torch.no_grad():
        ours = model.vision(pixels)
        theirs = siglip(pixels, output_hidden_states=True).hidden_states[case.feature_layer]
        vision_err = rel_err(ours, theirs)
        logits_err = rel_err(model.language(ids), qwen(input_ids=ids).logits)
    record("siglip_features", case.name, vision_err)
    record("qwen2_logits", case.name, logits_err)
    assert ours.shape == theirs.shape
    assert vision_err <= TOL
    assert logits_err <= TOL


def test_siglip_interpolates_positions_for_other_sizes(tmp_path, seed):
    case = CASES[0]
    siglip, qwen = make_siglip(case, seed), make_qwen2(case, seed)
    siglip.save_pretrained(tmp_path / "siglip")
    qwen.save_pretrained(tmp_path / "qwen")
    import_hf(tmp_path / "ckpt", vision=tmp_path / "siglip", llm=tmp_path / "qwen",
              image_token_id=case.image_token_id)
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt").eval()
    pixels = torch.randn(2, 3, case.image_size + 16, case.image_size + 16)
    with torch.no_grad():
        ours = model.vision(pixels)
        theirs = siglip(pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
    err = rel_err(ours, theirs)
    record("siglip_interpolated", case.name, err)
    assert ours.shape[1] == ((case.image_size + 16) // case.patch_size) ** 2
    assert err <= TOL


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mllm_matches_llava(case, tmp_path, seed):
    hf = make_llava(case, seed)
    hf.save_pretrained(tmp_path / "llava")
    import_hf(tmp_path / "ckpt", llava=tmp_path / "llava")
    model = VisionLanguageModel.from_checkpoint(tmp_path / "ckpt").eval()
    # Two images in the second sample.
    ids, pixels = mllm_inputs(case, seed, images_per_row=(1, 2))
    with torch.no_grad():
        ours = model(ids, pixels)
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    err = rel_err(ours, theirs)
    record("llava_logits", case.name, err)
    assert ours.shape == theirs.shape == (*ids.shape, case.vocab)
    assert err <= TOL


def test_image_token_count_mismatch_is_a_clear_error(seed):
    model, case = tiny_model(seed)
    ids, pixels = mllm_inputs(case, seed, images_per_row=(1, 1))
    with pytest.raises(ImageTokenMismatchError, match=r"hold 2?\d* image tokens .* 3 image\(s\)"):
        model(ids, torch.cat([pixels, pixels[:1]]))
    with pytest.raises(ImageTokenMismatchError, match="0 features"):
        model(ids)
