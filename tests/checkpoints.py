"""The catalogue of released InternVL checkpoints: a config.json dict for each, built from the real config files in
shared/assets/configs where one exists and otherwise from the reference numbers (shared/reference/language-models.md
§1, vision-and-chat.md §1.1, §5.4, §9), with the parameter count OpenGVLab published for it and where that number is
from.

Used by tests/test_checkpoints.py (meta-device parameter counts, refusals, -hf configs) and scripts/support_table.py
(the README table). Nothing here imports nanovl.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
CONFIGS = ASSETS / "configs"
LM_DOC, VC_DOC = "language-models.md", "vision-and-chat.md"

# ------------------------------------------------------------------------------------------------------------------
# InternViT (vision-and-chat.md §1.1). The 6B configs omit norm_type: the class default rms_norm applies.
# ------------------------------------------------------------------------------------------------------------------

VIT_300M = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=1024, num_hidden_layers=24,
                num_attention_heads=16, intermediate_size=4096, qkv_bias=True, qk_normalization=False,
                norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu", image_size=448, patch_size=14,
                num_channels=3)
VIT_6B = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=3200, num_hidden_layers=45,
              num_attention_heads=25, intermediate_size=12800, qkv_bias=False, qk_normalization=True,
              layer_norm_eps=1e-6, hidden_act="gelu", image_size=448, patch_size=14, num_channels=3)
VITS = {  # name on the model card -> config
    "InternViT-300M-448px": VIT_300M, "InternViT-300M-448px-V2_5": VIT_300M,
    "InternViT-6B-448px-V1-2": VIT_6B, "InternViT-6B-448px-V1-5": VIT_6B, "InternViT-6B-448px-V2_5": VIT_6B,
}

# ------------------------------------------------------------------------------------------------------------------
# Decoders (language-models.md §1; Phi-3 factors from its Appendix A)
# ------------------------------------------------------------------------------------------------------------------

PHI3_LONG = [1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
             1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
             1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164,
             5.489999771118164, 9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
             15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203,
             32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
             56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844,
             61.190006256103516, 61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
             63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625,
             64.80001068115234, 64.81001281738281, 64.81001281738281]
PHI3_SHORT = ([1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002, 1.4000000000000004,
               1.4500000000000004, 1.5500000000000005, 1.8500000000000008, 1.9000000000000008]
              + [2.000000000000001] * 19 + [2.1000000000000005, 2.1000000000000005, 2.2] + [2.3499999999999996] * 4
              + [2.3999999999999995] * 2 + [2.6499999999999986, 2.6999999999999984, 2.8999999999999977,
                                            2.9499999999999975] + [3.049999999999997] * 3)


def _lm(arch, model_type, H, L, nH, nKV, I, V, theta, eps, max_pos, **extra):
    return dict(architectures=[arch], model_type=model_type, hidden_size=H, num_hidden_layers=L, num_attention_heads=nH,
                num_key_value_heads=nKV, intermediate_size=I, vocab_size=V, rope_theta=theta, rms_norm_eps=eps,
                max_position_embeddings=max_pos, hidden_act="silu", tie_word_embeddings=False, **extra)


def qwen2(H, L, nH, nKV, I, V=151674, dynamic=False):
    """Qwen2 / Qwen2.5; InternVL3 adds dynamic NTK factor 2.0 to every Qwen2.5 config (§1c)."""
    rope = {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"} if dynamic else None
    return _lm("Qwen2ForCausalLM", "qwen2", H, L, nH, nKV, I, V, 1e6, 1e-6, 32768, rope_scaling=rope,
               use_sliding_window=False)


def internlm2(H, L, nH, nKV, I, V=92553, theta=1e6, factor=2.0):
    return _lm("InternLM2ForCausalLM", "internlm2", H, L, nH, nKV, I, V, theta, 1e-5, 32768, bias=False,
               rope_scaling={"type": "dynamic", "factor": factor})


def llama(H, L, nH, nKV, I, V, theta, max_pos):
    return _lm("LlamaForCausalLM", "llama", H, L, nH, nKV, I, V, theta, 1e-5, max_pos, attention_bias=False,
               rope_scaling=None)


def phi3():  # Phi-3-mini-128k-instruct, April 2024 ("su" LongRoPE)
    return _lm("Phi3ForCausalLM", "phi3", 3072, 32, 32, 32, 8192, 32020, 10000.0, 1e-5, 131072,
               original_max_position_embeddings=4096,
               rope_scaling={"type": "su", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG})


def qwen3(H, L, nH, nKV, I, V=151936):
    return _lm("Qwen3ForCausalLM", "qwen3", H, L, nH, nKV, I, V, 1e6, 1e-6, 40960, head_dim=128,
               attention_bias=False, rope_scaling=None)


YI_34B = dict(H=7168, L=60, nH=56, nKV=8, I=20480, V=64007, theta=5e6, max_pos=4096)  # Nous-Hermes-2-Yi-34B

# ------------------------------------------------------------------------------------------------------------------
# InternVLChatConfig (vision-and-chat.md §9) and the real files
# ------------------------------------------------------------------------------------------------------------------


def chat_config(vit: dict, llm: dict, template: str, *, ps_version="v2", dynamic=True, max_dynamic_patch=12,
                **extra) -> dict:
    return dict(architectures=["InternVLChatModel"], model_type="internvl_chat", vision_config=copy.deepcopy(vit),
                llm_config=copy.deepcopy(llm), template=template, select_layer=-1, downsample_ratio=0.5,
                ps_version=ps_version, force_image_size=448, dynamic_image_size=dynamic, use_thumbnail=dynamic,
                max_dynamic_patch=max_dynamic_patch if dynamic else 1, min_dynamic_patch=1, pad2square=False,
                hidden_size=llm["hidden_size"], tie_word_embeddings=False, torch_dtype="bfloat16", **extra)


def asset_config(relpath: str) -> dict:
    return json.loads((CONFIGS / relpath).read_text())


def internvl3_5_1b_config() -> dict:
    """Only its llm_config was found (a GPTQ copy: without quantization_config it describes the bf16 shapes)."""
    llm = asset_config("InternVL3_5-1B/llm_config.gptq_int4.ax-llm.json")
    llm.pop("quantization_config")
    return chat_config(VIT_300M, llm, "internvl2_5")


# ------------------------------------------------------------------------------------------------------------------
# Published sizes
# ------------------------------------------------------------------------------------------------------------------

B = 1e9
MODEL_CARD_2B = "HF model card OpenGVLab/InternVL2-2B, 'Model Size' row"
MODEL_CARD_8B = "HF model card OpenGVLab/InternVL2-8B, 'Model Size' row"
MODEL_CARD_40B = "HF model card OpenGVLab/InternVL2-40B (commit e1bd7d6), 'Model Size' row"
MODEL_CARD_V1_2 = "HF model card OpenGVLab/InternVL-Chat-V1-2, 'Params: 40B'"
ASSET_CARD_1B = "assets/configs/InternVL2-1B/README.model_card.md, 'Model Size' row"


@dataclass(frozen=True)
class Published:
    """A published size, as a parameter interval [lo, hi] that the number's own rounding allows."""
    text: str  # as published, e.g. "0.938B", "2.12 GB (bf16)", "name: 14B"
    lo: float
    hi: float
    source: str
    kind: str  # "exact" | "rounded" | "bytes" | "name"

    def check(self, n: int) -> bool:
        return self.lo <= n <= self.hi


def rounded(value_b: float, decimals: int, source: str) -> Published:
    """A count in billions printed with `decimals` digits: true value within half a unit of the last digit."""
    half = 0.5 * 10 ** -decimals * B
    return Published(f"{value_b:.{decimals}f}B", value_b * B - half, value_b * B + half, source,
                     "exact" if decimals >= 3 else "rounded")


def gigabytes(gb: float, source: str) -> Published:
    """A bf16 repo size in GB (1e9 bytes, 2 decimals): 2 bytes per parameter, plus safetensors headers (< 1 MB)."""
    half = 0.005e9
    return Published(f"{gb:.2f} GB bf16", (gb * 1e9 - half - 1e6) / 2, (gb * 1e9 + half) / 2, source, "bytes")


def name_size(size_b: float, rel: float = 0.2) -> Published:
    """Only the size class in the model name was found offline. Names are size classes, not rounded counts
    (InternVL3-14B has 15.1B parameters, InternVL2_5-4B 3.7B), so this is a coarse +-20% check; the exact check for
    these rows is test_checkpoints.py's count from the spec's tensor tables."""
    return Published(f"name {size_b:g}B ±{rel:.0%}", size_b * B * (1 - rel), size_b * B * (1 + rel),
                     "the model name only (size class)", "name")


# The one single-file size known to the byte: 2 bytes per bf16 parameter + 8 + the JSON header (< 100 kB).
INTERNVL2_1B_BYTES = 1_876_395_376
INTERNVL2_1B = Published("1,876,395,376-byte model.safetensors (bf16)", (INTERNVL2_1B_BYTES - 100_000) / 2,
                         (INTERNVL2_1B_BYTES - 8) / 2, "assets/configs/InternVL2-1B/model.safetensors.lfs-pointer.txt",
                         "bytes")

# ------------------------------------------------------------------------------------------------------------------
# The catalogue
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    name: str  # OpenGVLab/<name> on the hub
    series: str
    vit: str  # vision encoder on the model card
    base: str  # base LLM
    config: dict = field(repr=False)
    published: Published
    config_source: str  # where the config dict comes from
    hf: str | None = None  # the transformers "-hf" repo, where OpenGVLab published one
    also: str = ""  # other repos with the same architecture
    notes: str = ""

    @property
    def arch(self) -> str:
        return self.config["llm_config"]["architectures"][0]

    @property
    def vit_size(self) -> str:
        return "6B" if self.config["vision_config"]["hidden_size"] == 3200 else "300M"


def _row(name, series, vit, base, llm, template, published, *, config=None, config_source=None, hf=None, also="",
         notes="", **chat_kw):
    if config is None:
        config = chat_config(VITS[vit], llm, template, **chat_kw)
    return Checkpoint(name, series, vit, base, config, published,
                      config_source or f"{LM_DOC} §1 + {VC_DOC} §1.1/§5.4", hf, also, notes)


def _v1_2(name, published, **kw):
    """V1-2: 448px single tile, ps_version v1 (vision-and-chat.md §4.3, §5.4)."""
    return _row(name, "1.2", "InternViT-6B-448px-V1-2", "Nous-Hermes-2-Yi-34B", llama(**YI_34B), "Hermes-2",
                published, ps_version="v1", dynamic=False, **kw)


MPO = "-MPO, -Pretrained, -Instruct"
CHECKPOINTS: list[Checkpoint] = [
    # ---- InternVL 1.2 / 1.5
    _v1_2("InternVL-Chat-V1-2", rounded(40, 0, MODEL_CARD_V1_2)),
    _v1_2("InternVL-Chat-V1-2-Plus", rounded(40, 0, f"{MODEL_CARD_V1_2} (same architecture)"),
          system_message="Answer the questions.",
          notes="system_message 'Answer the questions.' (config.json)"),
    _row("InternVL-Chat-V1-5", "1.5", "InternViT-6B-448px-V1-5", "internlm2-chat-20b",
         internlm2(6144, 48, 48, 8, 16384, factor=3.0), "internlm2-chat",
         rounded(25.5, 1, f"{MODEL_CARD_8B} / {MODEL_CARD_40B}")),
    _row("Mini-InternVL-Chat-2B-V1-5", "1.5", "InternViT-300M-448px", "internlm2-chat-1_8b",
         internlm2(2048, 24, 16, 8, 8192), "internlm2-chat", rounded(2.2, 1, ASSET_CARD_1B)),
    _row("Mini-InternVL-Chat-4B-V1-5", "1.5", "InternViT-300M-448px", "Phi-3-mini-128k-instruct", phi3(), "phi3-chat",
         name_size(4)),
    # ---- InternVL 2.0
    _row("InternVL2-1B", "2.0", "InternViT-300M-448px", "Qwen2-0.5B-Instruct", None, "Hermes-2", INTERNVL2_1B,
         config=asset_config("InternVL2-1B/config.json"),
         config_source="assets/configs/InternVL2-1B/config.json (real)"),
    _row("InternVL2-2B", "2.0", "InternViT-300M-448px", "internlm2-chat-1_8b", None, "internlm2-chat",
         rounded(2.2, 1, MODEL_CARD_2B), config=asset_config("InternVL2-2B/config.ft-uav-derivative.json"),
         config_source="assets/configs/InternVL2-2B/config.ft-uav-derivative.json (a same-architecture fine-tune)"),
    _row("InternVL2-4B", "2.0", "InternViT-300M-448px", "Phi-3-mini-128k-instruct", phi3(), "phi3-chat",
         name_size(4)),
    _row("InternVL2-8B", "2.0", "InternViT-300M-448px", "internlm2_5-7b-chat", internlm2(4096, 32, 32, 8, 14336),
         "internlm2-chat", rounded(8.1, 1, MODEL_CARD_8B)),
    _row("InternVL2-26B", "2.0", "InternViT-6B-448px-V1-5", "internlm2-chat-20b",
         internlm2(6144, 48, 48, 8, 16384, factor=3.0), "internlm2-chat", name_size(26)),
    _row("InternVL2-40B", "2.0", "InternViT-6B-448px-V1-5", "Nous-Hermes-2-Yi-34B", llama(**YI_34B), "Hermes-2",
         rounded(40, 0, MODEL_CARD_40B)),
    _row("InternVL2-Llama3-76B", "2.0", "InternViT-6B-448px-V1-5", "Hermes-2-Theta-Llama-3-70B",
         llama(8192, 80, 64, 8, 28672, 128265, 500000.0, 8192), "internlm2-chat", name_size(76),
         notes="template internlm2-chat per the training script (stop token <|im_end|> = 128003)"),
    # ---- InternVL 2.5 (the -hf repos are the -MPO ones)
    _row("InternVL2_5-1B", "2.5", "InternViT-300M-448px-V2_5", "Qwen2.5-0.5B-Instruct", qwen2(896, 24, 14, 2, 4864),
         "internvl2_5", name_size(1), hf="InternVL2_5-1B-MPO-hf", also=MPO),
    _row("InternVL2_5-2B", "2.5", "InternViT-300M-448px-V2_5", "internlm2_5-1_8b-chat",
         internlm2(2048, 24, 16, 8, 8192),
         "internvl2_5", name_size(2), hf="InternVL2_5-2B-MPO-hf", also=MPO),
    _row("InternVL2_5-4B", "2.5", "InternViT-300M-448px-V2_5", "Qwen2.5-3B-Instruct", qwen2(2048, 36, 16, 2, 11008),
         "internvl2_5", name_size(4), hf="InternVL2_5-4B-MPO-hf", also=MPO),
    _row("InternVL2_5-8B", "2.5", "InternViT-300M-448px-V2_5", "internlm2_5-7b-chat", internlm2(4096, 32, 32, 8, 14336),
         "internvl2_5", name_size(8), hf="InternVL2_5-8B-MPO-hf", also=MPO),
    _row("InternVL2_5-26B", "2.5", "InternViT-6B-448px-V2_5", "internlm2_5-20b-chat",
         internlm2(6144, 48, 48, 8, 16384, theta=5e7, factor=2.5), "internvl2_5", name_size(26),
         hf="InternVL2_5-26B-MPO-hf", also=MPO),
    _row("InternVL2_5-38B", "2.5", "InternViT-6B-448px-V2_5", "Qwen2.5-32B-Instruct", qwen2(5120, 64, 40, 8, 27648),
         "internvl2_5", name_size(38), hf="InternVL2_5-38B-MPO-hf", also=MPO),
    _row("InternVL2_5-78B", "2.5", "InternViT-6B-448px-V2_5", "Qwen2.5-72B-Instruct", qwen2(8192, 80, 64, 8, 29568),
         "internvl2_5", name_size(78), hf="InternVL2_5-78B-MPO-hf", also=MPO),
    # ---- InternVL 3
    _row("InternVL3-1B", "3", "InternViT-300M-448px-V2_5", "Qwen2.5-0.5B", None, "internvl2_5",
         rounded(0.938, 3, f"{LM_DOC} §1 (S11/S12: readthedocs quick start; 1.88 GB repo)"),
         config=asset_config("InternVL3-1B/config.printed_from_model.config.json"),
         config_source="assets/configs/InternVL3-1B/config.printed_from_model.config.json (printed)",
         hf="InternVL3-1B-hf", also="-Instruct, -Pretrained"),
    _row("InternVL3-2B", "3", "InternViT-300M-448px-V2_5", "Qwen2.5-1.5B", None, "internvl2_5",
         rounded(2.089, 3, f"{LM_DOC} §1 (S11/S12: readthedocs quick start; 4.18 GB repo)"),
         config=asset_config("InternVL3-2B/config.json"),
         config_source="assets/configs/InternVL3-2B/config.json (real)",
         hf="InternVL3-2B-hf", also="-Instruct, -Pretrained"),
    _row("InternVL3-8B", "3", "InternViT-300M-448px-V2_5", "Qwen2.5-7B", qwen2(3584, 28, 28, 4, 18944, dynamic=True),
         "internvl2_5", name_size(8), hf="InternVL3-8B-hf", also="-Instruct, -Pretrained"),
    _row("InternVL3-9B", "3", "InternViT-300M-448px-V2_5", "internlm3-8b-instruct",
         internlm2(4096, 48, 32, 2, 10240, V=128512, theta=5e7, factor=6.0), "internvl2_5", name_size(9),
         hf="InternVL3-9B-hf", also="-Instruct, -Pretrained",
         notes="InternLM3 weights stored as InternLM2ForCausalLM; vocab and rope from the InternLM3 base (not seen in "
               "the checkpoint's own config)"),
    _row("InternVL3-14B", "3", "InternViT-300M-448px-V2_5", "Qwen2.5-14B", qwen2(5120, 48, 40, 8, 13824, dynamic=True),
         "internvl2_5", name_size(14), hf="InternVL3-14B-hf", also="-Instruct, -Pretrained"),
    _row("InternVL3-38B", "3", "InternViT-6B-448px-V2_5", "Qwen2.5-32B", qwen2(5120, 64, 40, 8, 27648, dynamic=True),
         "internvl2_5", name_size(38), hf="InternVL3-38B-hf", also="-Instruct, -Pretrained"),
    _row("InternVL3-78B", "3", "InternViT-6B-448px-V2_5", "Qwen2.5-72B", qwen2(8192, 80, 64, 8, 29568, dynamic=True),
         "internvl2_5", name_size(78), hf="InternVL3-78B-hf", also="-Instruct, -Pretrained"),
    # ---- InternVL 3.5 (dense Qwen3)
    _row("InternVL3_5-1B", "3.5", "InternViT-300M-448px-V2_5", "Qwen3-0.6B", None, "internvl2_5",
         gigabytes(2.12, f"{LM_DOC} §1 (S11: HF repo size)"), config=internvl3_5_1b_config(),
         config_source="assets/configs/InternVL3_5-1B/llm_config.gptq_int4.ax-llm.json (real llm_config) + ViT 300M",
         hf="InternVL3_5-1B-HF", also="-Pretrained, -Instruct, -MPO"),
    _row("InternVL3_5-2B", "3.5", "InternViT-300M-448px-V2_5", "Qwen3-1.7B", qwen3(2048, 28, 16, 8, 6144),
         "internvl2_5", name_size(2), hf="InternVL3_5-2B-HF", also="-Pretrained, -Instruct, -MPO"),
    _row("InternVL3_5-4B", "3.5", "InternViT-300M-448px-V2_5", "Qwen3-4B", qwen3(2560, 36, 32, 8, 9728),
         "internvl2_5", name_size(4), hf="InternVL3_5-4B-HF", also="-Pretrained, -Instruct, -MPO"),
    _row("InternVL3_5-8B", "3.5", "InternViT-300M-448px-V2_5", "Qwen3-8B", qwen3(4096, 36, 32, 8, 12288),
         "internvl2_5", name_size(8), hf="InternVL3_5-8B-HF", also="-Pretrained, -Instruct, -MPO"),
    _row("InternVL3_5-14B", "3.5", "InternViT-300M-448px-V2_5", "Qwen3-14B", qwen3(5120, 40, 40, 8, 17408),
         "internvl2_5", name_size(14), hf="InternVL3_5-14B-HF", also="-Pretrained, -Instruct, -MPO"),
    _row("InternVL3_5-38B", "3.5", "InternViT-6B-448px-V2_5", "Qwen3-32B", qwen3(5120, 64, 64, 8, 25600),
         "internvl2_5", name_size(38), hf="InternVL3_5-38B-HF", also="-Pretrained, -Instruct, -MPO"),
]


def _flash(dense: Checkpoint, listed: float) -> Checkpoint:
    """InternVL3.5-Flash: the dense checkpoint plus the router (pooling_before_gating, gating) and mlp2 (internvl3_5.md
    §2.3); the thresholds are the transformers port's test values (the released ones were not seen offline). The
    listing gives whole billions, as a size class (2B-Flash: 2.49B)."""
    config = {**dense.config, "flash_mode": True, "flash_relative_threshold": 0.1, "flash_absolute_threshold": 0.5}
    published = Published(f"{listed:g}B listed (class: -20%, +1B)", listed * B * 0.8, (listed + 1) * B,
                          "third-party listing of the Flash collection (internvl3_5.md §2.1), whole billions", "name")
    return Checkpoint(dense.name + "-Flash", "3.5", dense.vit, dense.base, config, published,
                      dense.config_source + " + the Flash router", notes="")


CHECKPOINTS += [_flash(c, size) for c, size in zip([c for c in CHECKPOINTS if c.series == "3.5"], [1, 2, 5, 9, 15, 40])]
BY_NAME = {c.name: c for c in CHECKPOINTS}

# ------------------------------------------------------------------------------------------------------------------
# Released checkpoints nanovl refuses at load time (language-models.md §1d), and a made-up architecture
# ------------------------------------------------------------------------------------------------------------------


def _moe(H, L, nH, nKV, experts, moe_I):
    lm = _lm("Qwen3MoeForCausalLM", "qwen3_moe", H, L, nH, nKV, 6144, 151936, 1e6, 1e-6, 40960, head_dim=128)
    lm.update(num_experts=experts, moe_intermediate_size=moe_I, num_experts_per_tok=8, norm_topk_prob=True)
    return lm


GPT_OSS_20B = _lm("GptOssForCausalLM", "gpt_oss", 2880, 24, 64, 8, 2880, 201088, 150000.0, 1e-5, 131072, head_dim=64,
                  num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                  rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                "beta_fast": 32.0, "beta_slow": 1.0})
UNSUPPORTED = {
    "InternVL3_5-30B-A3B": chat_config(VIT_300M, _moe(2048, 48, 32, 4, 128, 768), "internvl2_5"),
    "InternVL3_5-241B-A28B": chat_config(VIT_6B, _moe(4096, 94, 64, 4, 128, 1536), "internvl2_5"),
    "InternVL3_5-GPT-OSS-20B-A4B-Preview": chat_config(VIT_300M, GPT_OSS_20B, "internvl3_5_gpt_oss"),
    # an SSM: no attention fields at all, so it must be refused before they are read
    "an unknown architecture": chat_config(
        VIT_300M, dict(architectures=["MambaForCausalLM"], model_type="mamba", hidden_size=768, num_hidden_layers=24,
                       state_size=16, intermediate_size=1536, vocab_size=50280), "internvl2_5"),
}

# The rows whose config is a real file, built again from the reference numbers alone: test_checkpoints.py checks that
# both describe the same model, which validates the builders every other row is made with.
FROM_REFERENCE = {
    "InternVL2-1B": chat_config(VIT_300M, qwen2(896, 24, 14, 2, 4864, V=151655), "Hermes-2"),
    "InternVL2-2B": chat_config(VIT_300M, internlm2(2048, 24, 16, 8, 8192), "internlm2-chat"),
    "InternVL3-1B": chat_config(VIT_300M, qwen2(896, 24, 14, 2, 4864, dynamic=True), "internvl2_5"),
    "InternVL3-2B": chat_config(VIT_300M, qwen2(1536, 28, 12, 2, 8960, dynamic=True), "internvl2_5"),
    "InternVL3_5-1B": chat_config(VIT_300M, qwen3(1024, 28, 16, 8, 3072), "internvl2_5"),
}
