"""Evaluating the vision encoder: classification probes on its features, gradient saliency maps.

    from pivot_mega.eval.probe import run_probes             # prototype + logistic-regression probes
    from pivot_mega.eval.saliency import image_saliency      # d(loss)/d(image tokens) as heat maps

Submodules import torch and scikit-learn only when used.
"""
