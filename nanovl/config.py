"""config.json of an InternVL checkpoint, read into dataclasses whose fields keep config.json's names."""
import dataclasses
from dataclasses import dataclass, field

from nanovl.errors import NanovlError

# What each supported decoder architecture means for the one decoder in llm.py.
# qkv_bias: q/k/v projections have biases; qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
ARCHITECTURES = {
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=False, qk_norm=True),
    "LlamaForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "InternLM2ForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "Phi3ForCausalLM": dict(qkv_bias=False, qk_norm=False),
}


def _pick(cls, d: dict):
    """Build dataclass `cls` from the keys of `d` it knows; other keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def check_architecture(llm: dict) -> None:
    """Refuse an unknown decoder before reading its fields (an MoE or SSM config may lack the ones nanovl needs)."""
    arch = (llm.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise NanovlError(f"unsupported language model architecture {arch!r}; "
                          f"nanovl supports {', '.join(ARCHITECTURES)}")


def rope_fields(llm: dict) -> dict:
    """transformers >= 5 writes rope_theta and rope_scaling as one `rope_parameters` dict: split it back."""
    if not llm.get("rope_parameters"):
        return llm
    rope = dict(llm["rope_parameters"])
    theta = rope.pop("rope_theta", llm.get("rope_theta", 10000.0))
    return {**llm, "rope_theta": theta, "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope}


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "rms_norm"  # the InternViT class default: 6B configs omit the key
    layer_norm_eps: float = 1e-6
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LLMConfig:
    architectures: list
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    original_max_position_embeddings: int | None = None  # Phi-3 LongRoPE
    attention_bias: bool = False  # Llama / Qwen3 spelling
    bias: bool = False  # InternLM2 spelling
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        check_architecture({"architectures": self.architectures})
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def arch(self) -> str:
        return self.architectures[0]

    @property
    def qkv_bias(self) -> bool:
        return ARCHITECTURES[self.arch]["qkv_bias"] or self.attention_bias or self.bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias or self.bias

    @property
    def qkv_sizes(self) -> list:
        """Rows of q, k and v in the decoder's stacked qkv_proj (and in Phi-3's checkpoint qkv_proj)."""
        return [self.num_attention_heads * self.head_dim] + [self.num_key_value_heads * self.head_dim] * 2

    @property
    def qk_norm(self) -> bool:
        return ARCHITECTURES[self.arch]["qk_norm"]


@dataclass
class InternVLConfig:
    vision_config: VisionConfig
    llm_config: LLMConfig
    template: str = "internvl2_5"
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v1"  # the class default; every checkpoint since V1-5 says "v2"
    force_image_size: int | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    max_dynamic_patch: int = 6
    min_dynamic_patch: int = 1
    system_message: str | None = None
    rope_pos_id_version: str = "default"  # V2PE: "default" | "v2pe_fix" | "v2pe_rnd"
    rope_pos_id_stride: int | None = None
    image_token_id: int | None = None  # "-hf" configs only; otherwise the tokenizer's <IMG_CONTEXT>
    extra: dict = field(default_factory=dict, repr=False)  # the raw config.json

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:  # 256 for 448px tiles: (448/14)^2 * 0.5^2
        return int((self.image_size // self.vision_config.patch_size) ** 2 * self.downsample_ratio ** 2)

    @classmethod
    def from_dict(cls, d: dict) -> "InternVLConfig":
        if "llm_config" not in d or "vision_config" not in d:
            raise NanovlError("config.json has no llm_config/vision_config: not an InternVL checkpoint "
                              f"(architectures={d.get('architectures')}, model_type={d.get('model_type')!r})")
        check_architecture(d["llm_config"])
        top = {k: v for k, v in d.items() if k not in ("vision_config", "llm_config")}
        cfg = _pick(cls, {**top, "vision_config": _pick(VisionConfig, d["vision_config"]),
                          "llm_config": _pick(LLMConfig, rope_fields(d["llm_config"]))})
        cfg.extra = d
        return cfg
