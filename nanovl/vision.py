"""InternViT: the vision encoder (300M: LayerNorm + qkv bias; 6B: RMSNorm + qk-norm over the full width)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanovl.config import VisionConfig
from nanovl.llm import RMSNorm

FUSED_CPU = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, lin: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """lin(x), then the exact GELU if asked. CPU bf16 inference: one oneDNN call with the bias and the GELU applied to
    the GEMM's fp32 accumulator, no separate passes over the output (F.linear copies the bias into it first)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled() and FUSED_CPU:
        return torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = F.linear(x, lin.weight, lin.bias)
    return F.gelu(y) if gelu else y


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps) if cfg.norm_type == "layer_norm" else RMSNorm(dim, cfg.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.image_size // p  # 32 patches per side at 448px
        self.class_embedding = nn.Parameter(torch.empty(1, 1, C))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + self.grid ** 2, C))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, H, W)
        N, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, H*W, C), row-major over (y, x)
        cls = self.class_embedding.expand(N, 1, C).to(x.dtype)
        pos_cls, pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        if (H, W) != (self.grid, self.grid):  # other resolutions: bicubic in fp32 (an identity at the native grid)
            pos = pos.float().reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False)
            pos = pos.reshape(1, C, H * W).permute(0, 2, 1).to(pos_cls.dtype)
        return torch.cat([cls, x], dim=1) + torch.cat([pos_cls, pos], dim=1).to(x.dtype)  # (N, 1+H*W, C)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.qkv_bias)  # rows: [q heads | k heads | v heads]
        self.proj = nn.Linear(C, C)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:  # 6B: RMSNorm over all heads jointly (width C), not per head
            self.q_norm = RMSNorm(C, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(C, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = linear(x, self.qkv).split(C, dim=-1)  # 3 x (B, N, C)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, N, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v, no mask
        return linear(y.transpose(1, 2).reshape(B, N, C), self.proj)  # CPU: SDPA's output is (B, N, nh, hd) already


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return linear(linear(x, self.fc1, gelu=True), self.fc2)  # exact (erf) GELU


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's DropPath, as InternViT uses it): in training, each tile's residual branch is dropped
    with probability p and kept ones are scaled by 1/(1-p). (N, ...) -> (N, ...)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)  # (N, 1, 1)
    return x * keep.div_(1 - p) if p < 1 else x * keep


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path_rate: float = 0.0):
        super().__init__()
        C = cfg.hidden_size
        self.norm1, self.norm2 = make_norm(cfg, C), make_norm(cfg, C)
        self.attn, self.mlp = VisionAttention(cfg), VisionMLP(cfg)
        self.ls1 = nn.Parameter(torch.empty(C))  # layer scale
        self.ls2 = nn.Parameter(torch.empty(C))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        if not self.training:  # x + branch * layer scale in one pass
            x = torch.addcmul(x, self.attn(self.norm1(x).to(x.dtype)), self.ls1)
            return torch.addcmul(x, self.mlp(self.norm2(x).to(x.dtype)), self.ls2)
        x = x + drop_path(self.attn(self.norm1(x).to(x.dtype)) * self.ls1, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2, self.drop_path_rate, self.training)


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig, select_layer: int = -1):
        super().__init__()
        self.cfg = cfg
        # hidden_states = (embeddings, block 0, ..., block L-1): hidden_states[select_layer] needs the first n blocks only
        n = cfg.num_hidden_layers + 1 + select_layer if select_layer < 0 else select_layer
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.num_hidden_layers, device="cpu").tolist()  # per-block ramp
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(VisionLayer(cfg, rates[i]) for i in range(n))))
        self.gradient_checkpointing = False  # training: recompute each block in the backward pass
        if not self.embeddings.class_embedding.is_meta:
            self.init_weights()

    def set_drop_path_rate(self, rate: float) -> None:
        """The original's --drop_path_rate: linspace(0, rate, num_hidden_layers)[i] for block i."""
        self.cfg.drop_path_rate = rate
        rates = torch.linspace(0, rate, self.cfg.num_hidden_layers, device="cpu").tolist()
        for layer, r in zip(self.encoder.layers, rates):
            layer.drop_path_rate = r

    @torch.no_grad()
    def init_weights(self):
        """InternViT's own init (it has no _init_weights): standard-normal class and position embeddings, layer scale
        at initializer_factor, PyTorch's defaults for the convolution, linears and norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.embeddings.class_embedding.normal_()
        self.embeddings.position_embedding.normal_()
        for layer in self.encoder.layers:
            layer.ls1.fill_(self.cfg.initializer_factor)
            layer.ls2.fill_(self.cfg.initializer_factor)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # (N, 1025, C)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)  # the saved RNG state replays the same drop path
            else:
                x = layer(x)
        return x  # (N, 1025, C): class token first; no final norm
