"""config.json of an InternVL checkpoint, read into dataclasses whose fields keep config.json's names."""
import copy
import dataclasses
import math
import types
import typing
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


def _matches(value, annotation) -> bool:
    """Does a JSON value fit a field's annotation (int, float, bool, str, list, dict, X | None)?"""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:  # JSON writes 1e6 as a float and 10000 as an int: both are numbers
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(annotation) or annotation)


def _pick(cls, d: dict, where: str):
    """Build dataclass `cls` from the keys of `d` it knows (other keys are ignored), each checked against its type;
    the raw dict is kept in `.raw` so that saving writes back every key nanovl did not read."""
    if not isinstance(d, dict):
        raise NanovlError(f"config.json: {where.rstrip('.') or 'the top level'} must be a JSON object, got "
                          f"{type(d).__name__}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name == "raw" or f.name not in d:
            continue
        if not _matches(d[f.name], hints[f.name]):
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
            raise NanovlError(f"config.json: {where}{f.name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got "
                              f"{d[f.name]!r} (a {type(d[f.name]).__name__})")
        kw[f.name] = d[f.name]
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kw]
    if missing:
        raise NanovlError(f"config.json: {where.rstrip('.') or 'the top level'} lacks {', '.join(missing)}: the file is "
                          "incomplete")
    obj = cls(**kw)
    obj.raw = copy.deepcopy(d)
    return obj


def _positive(obj, where: str, *names) -> None:
    for n in names:
        if getattr(obj, n) is not None and getattr(obj, n) <= 0:
            raise NanovlError(f"config.json: {where}{n} must be positive, got {getattr(obj, n)}")


# decoders InternVL checkpoints use that nanovl does not implement: which checkpoints, and what is missing
NOT_IMPLEMENTED = {
    "Qwen3MoeForCausalLM": "InternVL3.5-30B-A3B / 241B-A28B: the Qwen3-MoE decoder (128 routed experts, top-8) is "
                           "not implemented",
    "qwen3_moe": "InternVL3.5-30B-A3B / 241B-A28B: the Qwen3-MoE decoder (128 routed experts, top-8) is not "
                 "implemented",
    "GptOssForCausalLM": "InternVL3.5-GPT-OSS-20B-A4B: the GPT-OSS decoder (MoE, attention sinks, sliding window, "
                         "YaRN) is not implemented",
    "gpt_oss": "InternVL3.5-GPT-OSS-20B-A4B: the GPT-OSS decoder (MoE, attention sinks, sliding window, YaRN) is not "
               "implemented",
}


def check_rope_scaling(llm) -> None:
    """The rope_scaling kinds llm.py implements, with the fields each reads."""
    r = llm.rope_scaling or {}
    kind = r.get("rope_type", r.get("type", "default"))
    fine = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0  # noqa: E731
    if kind == "dynamic":
        ok = fine(r.get("factor"))
    elif kind in ("su", "longrope"):
        orig = r.get("original_max_position_embeddings", llm.original_max_position_embeddings)
        ok = isinstance(orig, int) and orig > 1 and all(
            isinstance(r.get(k), list) and len(r[k]) == llm.head_dim // 2 and all(map(fine, r[k]))
            for k in ("short_factor", "long_factor"))
    else:
        ok = kind == "default"
    if not ok:
        raise NanovlError(f"config.json: llm_config.rope_scaling {r} is not one nanovl can apply: default, dynamic "
                          "(with a positive factor) or su/longrope (short_factor and long_factor of head_dim/2 "
                          "positive numbers, original_max_position_embeddings)")


def check_architecture(llm: dict) -> None:
    """Refuse an unknown decoder before reading its fields (an MoE or SSM config may lack the ones nanovl needs)."""
    archs = llm.get("architectures") if isinstance(llm, dict) else None
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        why = f" ({NOT_IMPLEMENTED[arch]})" if arch in NOT_IMPLEMENTED else ""
        raise NanovlError(f"unsupported language model architecture {arch!r}{why}; "
                          f"nanovl supports {', '.join(ARCHITECTURES)}")


def rope_fields(llm: dict) -> dict:
    """transformers >= 5 writes rope_theta and rope_scaling as one `rope_parameters` dict: split it back."""
    if not llm.get("rope_parameters"):
        return llm
    rope = dict(llm["rope_parameters"])
    theta = rope.pop("rope_theta", llm.get("rope_theta", 10000.0))
    out = {k: v for k, v in llm.items() if k != "rope_parameters"}
    return {**out, "rope_theta": theta, "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope}


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
    drop_path_rate: float = 0.0  # stochastic depth, training only (linspace over the blocks)
    initializer_factor: float = 0.1  # layer scale ls1/ls2 start at this value (the class default)
    raw: dict = field(default_factory=dict, repr=False)

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
    initializer_range: float = 0.02  # std of the normal init of linears and embeddings
    pad_token_id: int | None = None  # the embedding row that gets no gradient (nn.Embedding padding_idx)
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_architecture({"architectures": self.architectures})
        if self.num_key_value_heads is None:  # absent; a 0 is refused by check(), not replaced
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)

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
    # InternVL3.5-Flash: present (true or false) -> the router and mlp2 are built; true -> chat routes every tile
    flash_mode: bool | None = None
    flash_relative_threshold: float | None = None  # compress a tile if its score is above this quantile of the call's
    flash_absolute_threshold: float | None = None  # ... and at least this
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read (saving writes it back, updated)

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:  # 256 for 448px tiles: (448/14)^2 * 0.5^2
        return int((self.image_size // self.vision_config.patch_size) ** 2 * self.downsample_ratio ** 2)

    @classmethod
    def from_dict(cls, d: dict) -> "InternVLConfig":
        if not isinstance(d, dict):
            raise NanovlError(f"config.json must be a JSON object, got {type(d).__name__}")
        if "llm_config" not in d or "vision_config" not in d:
            raise NanovlError("config.json has no llm_config/vision_config: not an InternVL checkpoint "
                              f"(architectures={d.get('architectures')}, model_type={d.get('model_type')!r})")
        check_architecture(d["llm_config"])
        vision = _pick(VisionConfig, d["vision_config"], "vision_config.")
        llm = _pick(LLMConfig, rope_fields(d["llm_config"]), "llm_config.")
        top = {k: v for k, v in d.items() if k not in ("vision_config", "llm_config")}
        cfg = _pick(cls, {**top, "vision_config": vision, "llm_config": llm}, "")
        cfg.raw = copy.deepcopy(d)
        cfg.check()
        return cfg

    def check(self) -> None:
        """The ranges nanovl relies on: a wrong value here would otherwise fail deep inside the model."""
        v, l = self.vision_config, self.llm_config
        _positive(v, "vision_config.", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "image_size", "patch_size", "num_channels", "layer_norm_eps")
        _positive(l, "llm_config.", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "vocab_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                  "max_position_embeddings")
        _positive(self, "", "downsample_ratio", "max_dynamic_patch", "min_dynamic_patch", "force_image_size",
                  "rope_pos_id_stride")
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise NanovlError(f"config.json: min_dynamic_patch {self.min_dynamic_patch} is above max_dynamic_patch "
                              f"{self.max_dynamic_patch}")
        if l.head_dim % 2:
            raise NanovlError(f"config.json: llm_config head_dim {l.head_dim} is odd: rotary embeddings need an even one")
        if l.pad_token_id is not None and not -l.vocab_size <= l.pad_token_id < l.vocab_size:  # padding_idx
            raise NanovlError(f"config.json: llm_config.pad_token_id {l.pad_token_id} is outside the vocabulary "
                              f"of {l.vocab_size}")
        check_rope_scaling(l)
        if v.hidden_size % v.num_attention_heads:
            raise NanovlError(f"config.json: vision_config.hidden_size {v.hidden_size} is not a multiple of "
                              f"num_attention_heads {v.num_attention_heads}")
        if l.num_attention_heads % l.num_key_value_heads:
            raise NanovlError(f"config.json: llm_config.num_attention_heads {l.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {l.num_key_value_heads}")
        if v.norm_type not in ("rms_norm", "layer_norm"):
            raise NanovlError(f"config.json: vision_config.norm_type must be rms_norm or layer_norm, got {v.norm_type!r}")
        if self.ps_version not in ("v1", "v2"):
            raise NanovlError(f"config.json: ps_version must be v1 or v2, got {self.ps_version!r}")
        if self.rope_pos_id_version not in ("default", "v2pe_fix", "v2pe_rnd"):
            raise NanovlError(f"config.json: rope_pos_id_version {self.rope_pos_id_version!r} is not one of "
                              "default, v2pe_fix, v2pe_rnd")
        grid, scale = self.image_size // v.patch_size, 1 / self.downsample_ratio
        if scale != int(scale) or grid % int(scale) or grid < scale:
            raise NanovlError(f"config.json: downsample_ratio {self.downsample_ratio} does not divide the "
                              f"{grid}x{grid} patch grid")
        if not -v.num_hidden_layers - 1 <= self.select_layer <= v.num_hidden_layers:
            raise NanovlError(f"config.json: select_layer {self.select_layer} is outside the ViT's "
                              f"{v.num_hidden_layers} layers")
        if self.flash_mode is not None:
            self.check_flash()

    def check_flash(self) -> None:
        """The Flash router compresses 256-token tiles to 64 (pixel shuffle 0.25): a 32x32 patch grid, downsample
        0.5, the ViT's last layer (the original's extract_feature_flash ignores select_layer), and thresholds."""
        grid = self.image_size // self.vision_config.patch_size
        if grid != 32 or self.downsample_ratio != 0.5 or self.select_layer != -1:
            raise NanovlError(f"config.json: flash_mode needs a 32x32 patch grid, downsample_ratio 0.5 and "
                              f"select_layer -1 (the router's 256/64 tokens a tile); got {grid}x{grid}, "
                              f"{self.downsample_ratio}, {self.select_layer}")
        if not isinstance(self.flash_mode, bool):
            raise NanovlError(f"config.json: flash_mode must be true or false, got {self.flash_mode!r}")
        for name in ("flash_relative_threshold", "flash_absolute_threshold"):
            x = getattr(self, name)
            if self.flash_mode and (isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1):
                raise NanovlError(f"config.json: flash_mode is on, so {name} must be a number in [0, 1], got {x!r}")

    def to_dict(self) -> dict:
        """config.json in the original InternVLChatConfig schema: the file this config was read from (or, for a
        -hf checkpoint, its translation), with every field nanovl changed since written back."""
        def merged(obj, fresh):  # raw keys, updated where the field was read from it or has changed since
            out = copy.deepcopy(obj.raw)
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if f.name != "raw" and (f.name in obj.raw or value != getattr(fresh, f.name)) \
                        and not dataclasses.is_dataclass(value):
                    out[f.name] = copy.deepcopy(value)
            return out
        fresh = InternVLConfig.from_dict(self.raw) if self.raw else None
        if fresh is None:  # built in code, not read from a file: every field
            fresh = InternVLConfig(VisionConfig(), LLMConfig(["Qwen2ForCausalLM"], 0, 0, 1, 0, 0))
        top = merged(self, fresh)
        top["vision_config"] = merged(self.vision_config, fresh.vision_config)
        top["llm_config"] = merged(self.llm_config, fresh.llm_config)
        top["llm_config"].pop("rope_parameters", None)  # as rope_theta / rope_scaling: what transformers 4.37 reads
        top["hidden_size"] = self.llm_config.hidden_size
        return top
