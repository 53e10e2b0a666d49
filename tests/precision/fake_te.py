"""A stand-in for ``transformer_engine.pytorch`` in plain torch, for testing module selection and names.

It follows TE's documented module API where ``convert_to_te`` relies on it: constructor arguments
(``params_dtype``, ``device``, ``eps``, ``bias``, ``normalization``, ``activation``,
``parameters_split``), parameter names (``weight``/``bias``; ``layer_norm_weight``/``layer_norm_bias``;
``<split>_weight``/``<split>_bias``; ``fc1_weight`` ... ``fc2_bias``), attributes read at each call,
and the maths (RMSNorm / LayerNorm before the GEMM; ``gelu`` = tanh GELU; ``swiglu`` = SiLU of the
first half of fc1's output times the second half, as TE's own reference ``TorchGLU``). Every module records its constructor arguments in
``init_kwargs``. The real modules are tested separately where Transformer Engine is installed.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _param(*shape, params_dtype=None, device=None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=params_dtype or torch.get_default_dtype(), device=device))


def _norm(x, kind: str, weight, bias, eps: float):
    if kind == "RMSNorm":
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class _Recorded(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.init_kwargs = kwargs


class Linear(_Recorded):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features=in_features, out_features=out_features, bias=bias)
        self.weight = _param(out_features, in_features, params_dtype=params_dtype, device=device)
        self.bias = _param(out_features, params_dtype=params_dtype, device=device) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class LayerNorm(_Recorded):
    def __init__(self, hidden_size, eps=1e-5, params_dtype=None, device=None):
        super().__init__(hidden_size=hidden_size, eps=eps)
        self.eps = eps
        self.weight = _param(hidden_size, params_dtype=params_dtype, device=device)
        self.bias = _param(hidden_size, params_dtype=params_dtype, device=device)

    def forward(self, x):
        return _norm(x, "LayerNorm", self.weight, self.bias, self.eps)


class RMSNorm(_Recorded):
    def __init__(self, hidden_size, eps=1e-5, params_dtype=None, device=None):
        super().__init__(hidden_size=hidden_size, eps=eps)
        self.eps = eps
        self.weight = _param(hidden_size, params_dtype=params_dtype, device=device)

    def forward(self, x):
        return _norm(x, "RMSNorm", self.weight, None, self.eps)


class LayerNormLinear(_Recorded):
    def __init__(self, in_features, out_features, eps=1e-5, bias=True, normalization="LayerNorm",
                 parameters_split=None, params_dtype=None, device=None):
        super().__init__(in_features=in_features, out_features=out_features, eps=eps, bias=bias,
                         normalization=normalization, parameters_split=parameters_split)
        assert normalization in ("LayerNorm", "RMSNorm")
        self.eps, self.normalization = eps, normalization
        where = dict(params_dtype=params_dtype, device=device)
        self.layer_norm_weight = _param(in_features, **where)
        self.layer_norm_bias = _param(in_features, **where) if normalization == "LayerNorm" else None
        splits = parameters_split or {"": out_features}
        assert sum(splits.values()) == out_features
        self.names = []
        for name, size in splits.items():
            prefix = f"{name.rstrip('_')}_" if name else ""
            self.names.append(prefix)
            self.register_parameter(f"{prefix}weight", _param(size, in_features, **where))
            self.register_parameter(f"{prefix}bias", _param(size, **where) if bias else None)

    def forward(self, x):
        x = _norm(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        weight = torch.cat([getattr(self, f"{p}weight") for p in self.names])
        bias = torch.cat([getattr(self, f"{p}bias") for p in self.names]) if self.init_kwargs["bias"] else None
        return F.linear(x, weight, bias)


class LayerNormMLP(_Recorded):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, bias=True, normalization="LayerNorm",
                 activation="gelu", params_dtype=None, device=None):
        super().__init__(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, eps=eps, bias=bias,
                         normalization=normalization, activation=activation)
        assert activation in ("gelu", "swiglu"), "the stand-in implements TE's gelu (tanh) and swiglu"
        self.eps, self.normalization, self.activation = eps, normalization, activation
        where = dict(params_dtype=params_dtype, device=device)
        fc1_out = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.layer_norm_weight = _param(hidden_size, **where)
        self.layer_norm_bias = _param(hidden_size, **where) if normalization == "LayerNorm" else None
        self.fc1_weight = _param(fc1_out, hidden_size, **where)
        self.fc1_bias = _param(fc1_out, **where) if bias else None
        self.fc2_weight = _param(hidden_size, ffn_hidden_size, **where)
        self.fc2_bias = _param(hidden_size, **where) if bias else None

    def forward(self, x):
        x = _norm(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        h = F.linear(x, self.fc1_weight, self.fc1_bias)
        if self.activation == "swiglu":  # TE: SiLU of the first half times the second half
            first, second = h.chunk(2, dim=-1)
            h = F.silu(first) * second
        else:
            h = F.gelu(h, approximate="tanh")
        return F.linear(h, self.fc2_weight, self.fc2_bias)


def fake_te() -> types.SimpleNamespace:
    """A namespace with the module classes ``convert_to_te`` uses."""
    return types.SimpleNamespace(Linear=Linear, LayerNorm=LayerNorm, RMSNorm=RMSNorm,
                                 LayerNormLinear=LayerNormLinear, LayerNormMLP=LayerNormMLP)


class FakeRecipe:
    """``transformer_engine.common.recipe`` stand-in: recipes remember their arguments."""

    class Format:
        HYBRID = "HYBRID"
        E4M3 = "E4M3"

    class DelayedScaling(types.SimpleNamespace):
        pass

    class Float8CurrentScaling(types.SimpleNamespace):
        pass
