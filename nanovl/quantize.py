"""Opt-in int8 weight-only linears for the language model (never the ViT): half the bytes of bf16 per decoded token.

    model = nanovl.load(path, dtype=torch.bfloat16)
    quantize_int8(model.language_model)  # every Linear of the decoder and the lm_head; the embedding stays

Symmetric per-output-channel scales (gpt-fast's WeightOnlyInt8Linear); activations keep their dtype. The logit drift
against bf16 is measured by tests/test_speed_paths.py and reported in benchmarks/results.md.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale + bias, q int8 (out, in), scale (out,): w ~= q * scale[:, None]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()  # (out, in)
        scale = (w.abs().amax(dim=1).float().clamp(min=1e-8) / 127).to(w.dtype)  # (out,), stored as used
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        for i in range(0, len(w), 4096):  # in row blocks: no fp32 copy of a whole (vocab, hidden) lm_head
            q[i:i + 4096] = torch.round(w[i:i + 4096].float() / scale[i:i + 4096, None].float()).clamp(-127, 127)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if x.device.type == "cpu" and len(x2) <= 8:  # decode: ATen's int8 GEMV reads the weight once, as int8
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale.to(x.dtype))
        else:  # prefill (its int8 kernel is slow for many rows) and other devices: dequantize, float GEMM
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `module` (in place) by an Int8Linear; returns `module`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return module
