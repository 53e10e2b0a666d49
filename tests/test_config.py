"""Model configs: every preset and example YAML loads, presets have the published sizes, errors name the key."""

from pathlib import Path

import pytest

from pivot_mega.config import (ConfigError, LanguageConfig, ModelConfig, VisionConfig, from_dict,
                               load_model_config)
from pivot_mega.presets import model_preset_path, presets_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"  # run configs
PRESET_DIR = presets_dir()  # model configs, package data
PRESETS = PRESET_DIR / "models"  # their vision / language sections
PIVOT_DEFAULT = model_preset_path("pivot-1.5b")
TINY = model_preset_path("tiny")


# ------------------------------------------------------------------------------------------------
# Parameter counts from the config arithmetic alone (no model is built), with HF's module layout.


def qwen2_param_counts(lang: LanguageConfig) -> tuple[int, int]:
    """Returns (total, non-embedding) parameters of Qwen2ForCausalLM; a tied head counts once."""
    hidden, kv_dim = lang.hidden_size, lang.num_key_value_heads * lang.head_dim
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv_dim + kv_dim) + hidden * hidden  # q,k,v bias; o none
    mlp = 3 * hidden * lang.intermediate_size  # gate, up, down; no biases
    layer = attention + mlp + 2 * hidden  # input and post-attention RMSNorm
    embedding = lang.vocab_size * hidden * (1 if lang.tie_word_embeddings else 2)
    non_embedding = lang.num_hidden_layers * layer + hidden  # + final norm
    return embedding + non_embedding, non_embedding


def siglip_vision_param_count(vision: VisionConfig, *, with_head: bool) -> int:
    """Parameters of HF SiglipVisionModel with all num_hidden_layers (not only those PIVOT builds)."""
    hidden, inter = vision.hidden_size, vision.intermediate_size
    embeddings = (vision.num_channels * vision.patch_size**2 * hidden + hidden
                  + vision.num_patches * hidden)  # patch conv + bias, learned positions
    attention = 4 * (hidden * hidden + hidden)
    mlp = hidden * inter + inter + inter * hidden + hidden
    layer = attention + mlp + 2 * 2 * hidden  # two LayerNorms, weight + bias
    post_layernorm = 2 * hidden
    # Multihead attention pooling head: probe, attention (in/out projections), LayerNorm, MLP.
    head = hidden + attention + 2 * hidden + mlp
    return embeddings + vision.num_hidden_layers * layer + post_layernorm + (head if with_head else 0)


# Published sizes. Qwen2.5 model cards (Qwen/Qwen2.5-*-Instruct) give total and non-embedding counts.
QWEN_PUBLISHED = {
    "qwen2.5-0.5b.yaml": (0.49e9, 0.36e9),
    "qwen2.5-1.5b.yaml": (1.54e9, 1.31e9),
    "qwen2.5-3b.yaml": (3.09e9, 2.77e9),
    "qwen2.5-7b.yaml": (7.61e9, 6.53e9),
}
# (count, includes the pooling head, relative tolerance). B and L: SigLIP 2 paper (Tschannen et al.
# 2025), encoder without head. So400m: SoViT-400m/14 (Alabdulmohsin et al. 2023), 428M with head; the
# "400M" in its name is a round figure. g-opt: the SigLIP 2 paper only gives the round "1B".
SIGLIP_PUBLISHED = {
    "siglip2-base-patch16-384.yaml": (86e6, False, 0.03),
    "siglip2-large-patch16-384.yaml": (303e6, False, 0.03),
    "siglip2-so400m-patch16-384.yaml": (428e6, True, 0.03),
    "siglip2-giant-opt-patch16-384.yaml": (1.0e9, False, 0.15),
}


def test_count_helpers_match_a_hand_count_of_a_tiny_shape():
    # Independent of the helpers' formulas: every tensor of a 1-layer model written out by hand.
    lang = LanguageConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    # embed 40, lm_head 40, q 16+4, k 8+2, v 8+2, o 16, gate/up/down 3*24, 2 norms 8, final norm 4
    assert qwen2_param_counts(lang) == (40 + 40 + 20 + 10 + 10 + 16 + 72 + 8 + 4,
                                        20 + 10 + 10 + 16 + 72 + 8 + 4)
    vision = VisionConfig(hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
                          image_size=4, patch_size=2, num_channels=3, select_layer=-1)
    # conv 3*2*2*4+4, positions 4*4, q/k/v/o 4*20, fc1 24+6, fc2 24+4, 2 LayerNorms 16, post-LN 8
    body = 52 + 16 + 80 + 30 + 28 + 16 + 8
    # head: probe 4, attention 80, LayerNorm 8, MLP 58
    assert siglip_vision_param_count(vision, with_head=False) == body
    assert siglip_vision_param_count(vision, with_head=True) == body + 4 + 80 + 8 + 58


@pytest.mark.parametrize("name", sorted(QWEN_PUBLISHED))
def test_qwen_preset_matches_published_size(name):
    lang = from_dict(LanguageConfig, PRESETS / name)
    total, non_embedding = qwen2_param_counts(lang)
    published_total, published_non_embedding = QWEN_PUBLISHED[name]
    assert total == pytest.approx(published_total, rel=0.03)
    assert non_embedding == pytest.approx(published_non_embedding, rel=0.03)


@pytest.mark.parametrize("name", sorted(SIGLIP_PUBLISHED))
def test_siglip_preset_matches_published_size(name):
    vision = from_dict(VisionConfig, PRESETS / name)
    published, with_head, rel = SIGLIP_PUBLISHED[name]
    assert siglip_vision_param_count(vision, with_head=with_head) == pytest.approx(published, rel=rel)


def test_pivot_default_composes_so400m_and_qwen2_5_1_5b():
    config = load_model_config(PIVOT_DEFAULT)
    assert config.vision == from_dict(VisionConfig, PRESETS / "siglip2-so400m-patch16-384.yaml")
    assert config.language == from_dict(LanguageConfig, PRESETS / "qwen2.5-1.5b.yaml")
    assert config.projector.type == "mlp2x_gelu"
    assert config.image_token_id == 151655
    assert config.num_image_tokens == 576
    assert config.vision.num_layers_built == 26
    # Written `1e-6` in YAML; must arrive as a float, not the string PyYAML's 1.1 rules would give.
    assert isinstance(config.vision.layer_norm_eps, float) and config.vision.layer_norm_eps == 1e-6
    assert isinstance(config.language.rms_norm_eps, float) and config.language.rms_norm_eps == 1e-6


def test_tiny_config_is_tiny():
    config = load_model_config(TINY)
    assert config.num_image_tokens == 16
    assert config.image_token_id == config.language.vocab_size - 1
    total, _ = qwen2_param_counts(config.language)
    assert total + siglip_vision_param_count(config.vision, with_head=False) < 500_000


# ------------------------------------------------------------------------------------------------
# Every YAML under pivot_mega/presets and examples/configs loads and validates.


def _load_example(path: Path):
    if path.parent == PRESETS and path.name.startswith("siglip"):
        return from_dict(VisionConfig, path)
    if path.parent == PRESETS and path.name.startswith("qwen"):
        return from_dict(LanguageConfig, path)
    if path.parent == PRESET_DIR and path.name.startswith("model_"):
        return load_model_config(path)
    if path.parent == EXAMPLES and path.name.startswith("train_"):
        from pivot_mega.training.config import load_run_config
        config = load_run_config(path)
        assert config.stage in path.stem, (path, config.stage)
        return config.model
    raise AssertionError(f"{path}: no loader for this kind of config; add one to this test")


ALL_CONFIGS = [*sorted(PRESET_DIR.rglob("*.yaml")), *sorted(EXAMPLES.rglob("*.yaml"))]


def _config_id(path: Path) -> str:
    root = PRESET_DIR if PRESET_DIR in path.parents else EXAMPLES
    return f"{root.name}/{path.relative_to(root)}"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_config_id)
def test_every_example_config_loads_and_validates(path):
    config = _load_example(path)
    config.validate()


def test_example_configs_exist():
    assert len(list(PRESET_DIR.rglob("*.yaml"))) >= 11 and len(list(EXAMPLES.glob("train_*.yaml"))) == 4


def test_preset_paths_resolve_relative_to_the_naming_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_model_config(PIVOT_DEFAULT).language.hidden_size == 1536


# ------------------------------------------------------------------------------------------------
# Overrides


def test_override_sets_a_key_of_an_inline_section():
    config = load_model_config(TINY, ["language.num_hidden_layers=3", "vision.select_layer=-1"])
    assert config.language.num_hidden_layers == 3
    assert config.vision.select_layer == -1


def test_override_reaches_into_a_preset_section():
    config = load_model_config(PIVOT_DEFAULT, ["language.num_hidden_layers=3"])
    assert config.language.num_hidden_layers == 3
    assert config.language.hidden_size == 1536  # the rest still comes from the preset
    assert load_model_config(PIVOT_DEFAULT).language.num_hidden_layers == 28  # preset untouched


def test_override_parses_values_as_yaml_scalars():
    config = load_model_config(TINY, ["language.rope_theta=1e6", "language.tie_word_embeddings=false",
                                      "attention=sdpa"])
    assert config.language.rope_theta == 1e6 and isinstance(config.language.rope_theta, float)
    assert config.language.tie_word_embeddings is False
    assert config.attention == "sdpa"


def test_override_swaps_a_section_for_another_preset_then_sets_a_key_in_it():
    config = load_model_config(PIVOT_DEFAULT, ["language=models/qwen2.5-0.5b.yaml",
                                               "language.num_hidden_layers=2"])
    assert config.language.hidden_size == 896
    assert config.language.num_hidden_layers == 2


def test_override_into_an_empty_section(tmp_path):
    path = _write(tmp_path, "model.yaml", "language:\nimage_token_id: 5\n")
    assert load_model_config(path, ["language.num_hidden_layers=3"]).language.num_hidden_layers == 3


@pytest.mark.parametrize("override, key", [
    ("language.num_hidden_layers", "language.num_hidden_layers"),  # no '='
    ("attention=[sdpa", "attention"),  # not YAML
    ("image_token_id.value=1", "image_token_id"),  # a scalar is not a section
])
def test_malformed_override_is_a_config_error(override, key):
    with pytest.raises(ConfigError, match=key):
        load_model_config(TINY, [override])


# ------------------------------------------------------------------------------------------------
# Errors name the key


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("language:\n  hidden_sizee: 64\n", "hidden_sizee"),
    ("vision:\n  select_layers: -2\n", "select_layers"),
    ("projector:\n  kind: mlp2x_gelu\n", "kind"),
    ("image_token: 5\n", "image_token"),
])
def test_unknown_key_is_a_config_error_naming_it(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown key.*'{key}'"):
        load_model_config(_write(tmp_path, "model.yaml", text))


def test_unknown_key_in_a_preset_names_the_key_and_the_preset_file(tmp_path):
    _write(tmp_path, "models/lang.yaml", "hidden_size: 64\nnum_attention_heads: 4\nrope_thetta: 1.0\n")
    path = _write(tmp_path, "model.yaml", "language: models/lang.yaml\n")
    with pytest.raises(ConfigError, match=r"lang\.yaml.*rope_thetta"):
        load_model_config(path)
    with pytest.raises(ConfigError, match=r"lang\.yaml.*rope_thetta"):
        load_model_config(path, ["language.num_hidden_layers=1"])


def test_unknown_key_from_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match="num_hidden_layer'"):
        load_model_config(PIVOT_DEFAULT, ["language.num_hidden_layer=3"])


@pytest.mark.parametrize("text, key", [
    ("language:\n  num_hidden_layers: three\n", "language.num_hidden_layers"),
    ("language:\n  num_hidden_layers: 2.0\n", "language.num_hidden_layers"),
    ("language:\n  tie_word_embeddings: 1\n", "language.tie_word_embeddings"),
    ("language:\n  rope_theta: big\n", "language.rope_theta"),
    ("vision:\n  image_size: true\n", "vision.image_size"),
    ("vision: [1, 2]\n", "vision"),
    ("image_token_id: '5'\n", "image_token_id"),
    ("attention: fastest\n", "attention"),
    ("projector:\n  type: linear\n", "projector.type"),
])
def test_wrong_type_is_a_config_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_model_config(_write(tmp_path, "model.yaml", text))


def test_wrong_type_in_an_override_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_model_config(PIVOT_DEFAULT, ["language.num_hidden_layers=many"])


def test_missing_preset_file_is_a_config_error(tmp_path):
    path = _write(tmp_path, "model.yaml", "vision: models/nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_model_config(path)


# ------------------------------------------------------------------------------------------------
# Invalid layouts


@pytest.mark.parametrize("override, key", [
    ("language.num_attention_heads=3", "num_attention_heads"),  # 64 % 3
    ("vision.num_attention_heads=5", "num_attention_heads"),  # 64 % 5
    ("language.num_key_value_heads=3", "num_key_value_heads"),  # 4 % 3
    ("language.num_key_value_heads=0", "num_key_value_heads"),  # not a ZeroDivisionError
    ("language.num_attention_heads=0", "num_attention_heads"),
    ("language.hidden_size=12", "head_dim"),  # 12 / 4 heads = 3: odd, no RoPE pairs
    ("vision.patch_size=0", "patch_size"),
    ("vision.image_size=60", "patch_size"),  # 60 is not a multiple of 16
    ("vision.select_layer=4", "select_layer"),  # only 3 layers
    ("vision.select_layer=-5", "select_layer"),
    ("image_token_id=512", "image_token_id"),  # == vocab_size
    ("image_token_id=-1", "image_token_id"),
    ("checkpoint_every=0", "checkpoint_every"),
])
def test_invalid_layout_is_a_config_error(override, key):
    with pytest.raises(ConfigError, match=key):
        load_model_config(TINY, [override])


def test_model_config_defaults_are_pivot_default():
    assert ModelConfig().validate() == load_model_config(PIVOT_DEFAULT)
