"""pivot_mega: Megatron-style training of LLaVA-style MLLMs (SigLIP -> mlp2x_gelu -> Qwen2.5)
through the PIVOT stages."""

__version__ = "0.1.0"

__all__ = ["VisionLanguageModel", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import pivot_mega.config` (and the CLI's --help) does not import torch.
    if name == "VisionLanguageModel":
        from pivot_mega.models import VisionLanguageModel

        return VisionLanguageModel
    raise AttributeError(f"module 'pivot_mega' has no attribute {name!r}")
