"""LoRA as the original trains it (peft 0.10 through wrap_llm_lora / wrap_backbone_lora): rank r, alpha 2r, dropout
0.05, A ~ kaiming-uniform, B = 0, on the original's target modules of each family.

nanovl's decoder stacks q/k/v (qkv_proj) and gate/up (gate_up_proj). A LoRALinear on a stacked matrix holds one
(A, B) pair per projection the original targets, each over its own rows, so that

    y = W x + b + alpha/r * [B_q A_q x ; B_k A_k x ; B_v A_v x]      merged: W[rows_i] += alpha/r * B_i A_i

is exactly per-projection LoRA (the same parameters, gradients and merged weights). InternLM2 targets the fused
wqkv and Phi-3 the fused qkv_proj / gate_up_proj: one pair over all rows (InternLM2's B rows are stored in nanovl's
[q; k; v] order and regrouped when saved). The split of each matrix is the one weights.parts() uses for saving.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovl.llm import Linear
from nanovl.weights import parts

# the original's target modules (modeling_internvl_chat.py wrap_llm_lora / wrap_backbone_lora), as nanovl modules;
# the row split of a stacked one comes from weights.parts
LLM_TARGETS = {
    "InternLM2ForCausalLM": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "Phi3ForCausalLM": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "Qwen2ForCausalLM": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "LlamaForCausalLM": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "Qwen3ForCausalLM": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class LoRALinear(nn.Module):
    """A linear layer with LoRA pairs over consecutive row blocks `sizes` of its output. Shares the base layer's
    weight and bias (same state-dict names), adds lora_A.i (r, in) and lora_B.i (rows_i, r)."""

    def __init__(self, base: nn.Linear, sizes: list, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.sizes, self.r, self.scale = list(sizes), r, alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
                                       for _ in sizes)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(n, r, device=dev, dtype=dt)) for n in sizes)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's default init
        self.dropout = nn.ModuleList(nn.Dropout(dropout) for _ in sizes)  # one per target module, as peft
        self.enabled = True  # False: the base layer alone (the reference model of preference training)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        delta = [F.linear(F.linear(drop(x), a), b) for drop, a, b in zip(self.dropout, self.lora_A, self.lora_B)]
        return y + torch.cat(delta, dim=-1) * self.scale  # (..., out): each pair's rows in place

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain layer with W + alpha/r * B A in each row block (nanovl's decode Linear)."""
        out = Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                     device=self.weight.device, dtype=self.weight.dtype)
        delta = torch.cat([b.float() @ a.float() for a, b in zip(self.lora_A, self.lora_B)]) * self.scale
        out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


def _targets(model, part: str):
    """(parent module, attribute, nanovl weight name) of every target Linear of 'llm' or 'vit'."""
    root, names = (model.language_model, LLM_TARGETS[model.config.llm_config.arch]) if part == "llm" else \
        (model.vision_model, VIT_TARGETS)
    prefix = "language_model." if part == "llm" else "vision_model."
    for name, module in root.named_modules():
        for t in names:
            if name.endswith(t) and isinstance(module, nn.Linear):
                parent, attr = root.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                yield parent, attr, prefix + name + ".weight"


def add_lora(model, part: str, r: int, alpha: float | None = None, dropout: float = 0.05) -> list:
    """Wrap the target linears of the language model (part='llm', use_llm_lora) or the ViT ('vit',
    use_backbone_lora) with LoRA of rank r (alpha 2r unless given) and freeze every other parameter of that part,
    as get_peft_model does. -> the new LoRA parameters."""
    base = model.language_model if part == "llm" else model.vision_model
    for p in base.parameters():
        p.requires_grad_(False)
    new = []
    for parent, attr, wname in list(_targets(model, part)):
        lin = getattr(parent, attr)
        rows = [len(range(*rw.indices(lin.out_features))) if isinstance(rw, slice) else
                (lin.out_features if rw is None else len(rw))
                for _, rw in parts(wname, lin.weight.shape, model.config, "original")]
        lora = LoRALinear(lin, rows, r, 2 * r if alpha is None else alpha, dropout)
        setattr(parent, attr, lora)
        new += list(lora.lora_A) + list(lora.lora_B)
    return new


class adapters_disabled:
    """with adapters_disabled(model): the model without its LoRA deltas (peft's disable_adapter): the base model, the
    reference of MPO, with no second copy in memory."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if isinstance(m, LoRALinear)]

    def __enter__(self):
        for m in self.modules:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.modules:
            m.enabled = True


def merge_lora(model) -> int:
    """Replace every LoRALinear by its merged plain linear, in place. -> how many were merged."""
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, module.merged())
            n += 1
    return n


def lora_state_dict(model, grads: bool = False, state_dict: dict | None = None) -> dict:
    """The LoRA tensors (or their .grad) under the original's unmerged checkpoint names, per target projection:
    language_model.base_model.model.<module>.lora_A.default.weight (r, in) and .lora_B.default.weight (out, r),
    vision_model.base_model.model.<module>... (peft 0.10 key names, as modeling_internvl_chat writes them).
    state_dict: read the tensors from it (a gathered one under FSDP) instead of the modules."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        ckpt = parts(name + ".weight", module.weight.shape, model.config, "original")
        for i, ((ck, rows), a, b) in enumerate(zip(ckpt, module.lora_A, module.lora_B)):
            part, sub = ck.split(".", 1)  # language_model / vision_model, then the module path inside it
            key = f"{part}.base_model.model.{sub.removesuffix('.weight')}"
            A, B = (a.grad, b.grad) if grads else (a, b)
            if state_dict is not None:
                A, B = state_dict[f"{name}.lora_A.{i}"], state_dict[f"{name}.lora_B.{i}"]
            if B is not None and isinstance(rows, torch.Tensor):  # InternLM2's wqkv: B rows regrouped
                B = B[rows]
            out[f"{key}.lora_A.default.weight"] = None if A is None else A.detach()
            out[f"{key}.lora_B.default.weight"] = None if B is None else B.detach()
    return out


@torch.no_grad()
def merge_lora_state(model, state_dict: dict) -> dict:
    """A state dict of `model` (LoRA modules included) with every LoRA merged into its weight (computed in fp32) and
    the adapters removed: the tensors of the plain model."""
    out = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            w = state_dict[name + ".weight"]
            delta = torch.cat([state_dict[f"{name}.lora_B.{i}"].float() @ state_dict[f"{name}.lora_A.{i}"].float()
                               for i in range(len(module.sizes))]) * module.scale
            out[name + ".weight"] = (w.float() + delta).to(w.dtype)
    return out
