"""Load an InternVL checkpoint as published: original OpenGVLab layout or transformers "-hf", one or many safetensors.

Module names in nanovl equal the original keys of a Qwen2-backbone checkpoint, except that the decoder stacks
q/k/v and gate/up (FUSED); loading is a rename (InternLM2, Phi-3, -hf) plus a few splits of fused tensors, each
tensor read straight into its place, then `load_state_dict(strict, assign)`.
"""
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from nanovl.config import InternVLConfig
from nanovl.errors import NanovlError

# InternLM2 (and InternVL3-9B) -> nanovl names; wqkv is split separately.
INTERNLM2_RENAMES = [
    (r"\.tok_embeddings\.", ".embed_tokens."), (r"^language_model\.output\.", "language_model.lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."), (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."), (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
]
# transformers "-hf" -> original names (the inverse of transformers' convert_internvl_weights_to_hf.py).
HF_RENAMES = [
    (r"^model\.", ""), (r"^vision_tower\.", "vision_model."), (r"\.encoder\.layer\.", ".encoder.layers."),
    (r"\.embeddings\.cls_token", ".embeddings.class_embedding"),
    (r"\.embeddings\.position_embeddings", ".embeddings.position_embedding"),
    (r"\.embeddings\.patch_embeddings\.projection\.", ".embeddings.patch_embedding."),
    (r"\.lambda_(\d)", r".ls\1"), (r"\.attention\.projection_layer\.", ".attn.proj."), (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."), (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^language_model\.(?!model\.|lm_head\.)", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
]
HF_TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused wqkv rows are grouped per KV head: [q_0 .. q_{g-1}, k, v] for each of the n_kv groups."""
    g = num_heads // num_kv_heads
    w = wqkv.reshape(num_kv_heads, g + 2, head_dim, *wqkv.shape[1:])  # (n_kv, g+2, hd, [H])
    wq = w[:, :g].reshape(num_heads * head_dim, *wqkv.shape[1:])  # query head h = kv*g + s
    return wq, w[:, g].reshape(-1, *wqkv.shape[1:]), w[:, g + 1].reshape(-1, *wqkv.shape[1:])


def resolve(path) -> Path:
    """A local checkpoint directory, or a hub id (e.g. OpenGVLab/InternVL3-1B) downloaded into weights/."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NanovlError(f"{p} is a file: pass the checkpoint directory that holds config.json and *.safetensors")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) or str(path).startswith("."):
        raise NanovlError(f"no such checkpoint directory: {path}")
    local = Path(os.environ.get("NANOVL_WEIGHTS", "weights")) / str(path).split("/")[1]
    if (local / "config.json").exists() and list(local.glob("*.safetensors")):
        return local
    try:
        from huggingface_hub import snapshot_download
        print(f"downloading {path} into {local} ...", file=sys.stderr)
        snapshot_download(repo_id=str(path), local_dir=local,
                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "examples/*"])
    except Exception as e:  # offline, unknown repo, auth: one clear line
        raise NanovlError(f"could not download {path} from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else 'no network?'}); download it where there is "
                          f"network and pass the local directory instead, e.g. --model weights/{local.name}") from None
    return local


def read_config(path: Path) -> tuple[InternVLConfig, str]:
    """config.json -> (config, format) where format is 'original' or 'hf'."""
    if not (path / "config.json").exists():
        raise NanovlError(f"{path} has no config.json: not a checkpoint directory")
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NanovlError(f"cannot read {path / 'config.json'}: {e}") from None
    if d.get("model_type") != "internvl":
        return InternVLConfig.from_dict(d), "original"
    # transformers InternVLConfig -> the original InternVLChatConfig fields
    v, t = dict(d["vision_config"]), dict(d["text_config"])
    as_int = lambda x: x[0] if isinstance(x, list) else x  # noqa: E731
    v.update(qkv_bias=v.get("attention_bias", False), qk_normalization=v.get("use_qk_norm", False),
             image_size=as_int(v.get("image_size", 448)), patch_size=as_int(v.get("patch_size", 14)))
    if not t.get("architectures"):  # transformers writes null (or nothing) for a sub-config
        t["architectures"] = [HF_TEXT_ARCHITECTURES.get(t.get("model_type"), t.get("model_type"))]
    t.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
    cfg = dict(vision_config=v, llm_config=t, template="internvl2_5", ps_version="v2",
               select_layer=d.get("vision_feature_layer", -1), downsample_ratio=d.get("downsample_ratio", 0.5),
               dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=12, image_token_id=d.get("image_token_id"))
    return InternVLConfig.from_dict(cfg), "hf"


STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
# The decoder keeps the projections that read the same input in one matrix (llm.py: one GEMV per decode step):
# nanovl name -> the checkpoint names it stacks, in order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def safetensors_header(file: Path) -> dict:
    """name -> (dtype, shape, start, end) byte offsets. The format: an 8-byte little-endian header length, the JSON
    header {name: {dtype, shape, data_offsets}}, then the data."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items()}


def read_tensors(path: Path, dtype=None, private=lambda name: False):
    """Yield (name, tensor) from model.safetensors or the shards of model.safetensors.index.json, floating tensors in
    `dtype` (None: as stored). A tensor already in `dtype` is memory-mapped (zero-copy) unless private(name) asks for
    private memory: True (a fresh tensor) or the tensor to read it into. Reads go through one reused staging buffer:
    no page of a copied tensor stays mapped (peak RSS), no page faults on temporaries (load time)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise NanovlError(f"{path} has no *.safetensors files (nanovl reads safetensors checkpoints only)")
    for name in files:
        if not (path / name).exists():
            raise NanovlError(f"missing checkpoint shard {path / name} (listed in {index.name})")
        header, read = safetensors_header(path / name), {}  # read: name -> (dtype to read into, private(name))
        for key, (stored, _, _, _) in header.items():
            if stored in STORED_DTYPES:
                want = dtype if dtype is not None and STORED_DTYPES[stored].is_floating_point else STORED_DTYPES[stored]
                if (into := private(key)) is not False or want != STORED_DTYPES[stored]:
                    read[key] = want, into
        converted = [k for k, (want, _) in read.items() if want != STORED_DTYPES[header[k][0]]]
        staging = torch.empty(max((header[k][3] - header[k][2] for k in converted), default=0), dtype=torch.uint8)
        with safe_open(path / name, framework="pt") as f, open(path / name, "rb", buffering=0) as raw:
            for key in f.keys():
                if key not in read:
                    yield key, f.get_tensor(key)
                    continue
                (stored, shape, start, end), (want, into) = header[key], read[key]
                if not (isinstance(into, torch.Tensor) and list(into.shape) == shape and into.device.type == "cpu"):
                    into = torch.empty(shape, dtype=want)  # (a shape mismatch is reported by load_weights)
                direct = into.dtype == STORED_DTYPES[stored]  # read straight into place, else via the staging buffer
                buf = into.view(-1).view(torch.uint8) if direct else staging[:end - start]
                raw.seek(start)
                if raw.readinto(buf.numpy()) != end - start:
                    raise NanovlError(f"{path / name} is truncated (tensor {key})")
                yield key, into if direct else into.copy_(buf.view(STORED_DTYPES[stored]).view(shape))


def rename(key: str, cfg: InternVLConfig, fmt: str) -> str:
    """A checkpoint key -> its nanovl name (before the splits of fused tensors)."""
    renames = HF_RENAMES if fmt == "hf" else INTERNLM2_RENAMES if cfg.llm_config.arch == "InternLM2ForCausalLM" else []
    for pat, rep in renames:
        key = re.sub(pat, rep, key)
    return key


def convert(tensors, cfg: InternVLConfig, fmt: str):
    """Rename and split checkpoint tensors into nanovl names. Yields (name, tensor)."""
    llm = cfg.llm_config
    pending = {}  # -hf vision q/k/v, merged into the original fused qkv
    for key, t in tensors:
        key = rename(key, cfg, fmt)
        if key.endswith(".attention.wqkv.weight") or key.endswith(".attention.wqkv.bias"):  # InternLM2
            base, kind = key.rsplit(".attention.wqkv.", 1)
            for proj, w in zip("qkv", split_wqkv(t, llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim)):
                yield f"{base}.self_attn.{proj}_proj.{kind}", w
        elif key.endswith(".self_attn.qkv_proj.weight"):  # Phi-3: a plain [q; k; v] concatenation
            for proj, w in zip("qkv", t.split(llm.qkv_sizes)):
                yield key.replace(".qkv_proj.", f".{proj}_proj."), w
        elif key.endswith(".mlp.gate_up_proj.weight"):  # Phi-3: [gate; up]
            gate, up = t.chunk(2)
            yield key.replace("gate_up_proj", "gate_proj"), gate
            yield key.replace("gate_up_proj", "up_proj"), up
        elif m := re.match(r"(vision_model\..*\.attn\.)([qkv])_proj\.(weight|bias)$", key):  # -hf: re-fuse q/k/v
            group = pending.setdefault((m[1], m[3]), {})
            group[m[2]] = t
            if len(group) == 3:
                yield f"{m[1]}qkv.{m[3]}", torch.cat([group["q"], group["k"], group["v"]])
        else:
            yield key, t


def load_weights(model: torch.nn.Module, path: Path, fmt: str, dtype: torch.dtype, device) -> None:
    """Fill a meta-device model from the checkpoint: every tensor accounted for, no second copy kept."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    n_vit = len(model.vision_model.encoder.layers)
    unused = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")  # blocks after select_layer are not built
    llm, fused, slots = model.config.llm_config, {}, {}  # fused buffers; checkpoint name -> its rows of one
    rows = {name: [llm.intermediate_size] * 2 if "gate_up" in name else llm.qkv_sizes for name in FUSED}
    for key in [k for k in expected if k.startswith("language_model.")]:
        for name, parts in FUSED.items():
            if f".{name}." in key:  # the checkpoint's tensors are read straight into their rows of the fused buffer
                fused[key] = torch.empty(expected.pop(key), dtype=dtype, device=device)
                slices = fused[key].split(rows[name])
                parts = [key.replace(name, part) for part in parts]
                slots.update(zip(parts, slices))
                expected.update((part, t.shape) for part, t in zip(parts, slices))

    def private(key):  # the decoder in private memory: measured to decode faster than from mapped file pages (CPU)
        name = rename(key, model.config, fmt)
        if name in slots:
            return slots[name]
        return (name.startswith("language_model.") and ".embed_tokens." not in name) or ".attn.q_proj." in name \
            or ".attn.k_proj." in name or ".attn.v_proj." in name  # -hf vision q/k/v: re-fused, so copied anyway

    sd, unexpected, bad_shape = {}, [], []
    for key, t in convert(read_tensors(path, dtype, private), model.config, fmt):
        if (m := unused.match(key)) and int(m[1]) >= n_vit:
            continue
        if key not in expected:
            unexpected.append(key)
        elif t.shape != expected[key]:
            bad_shape.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(expected[key])}")
        else:
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            if key in slots and slots[key] is not t:  # split from a fused checkpoint tensor (InternLM2, Phi-3)
                t = slots[key].copy_(t)
            sd[key] = t.contiguous()
    tied = model.config.llm_config.tie_word_embeddings and "language_model.lm_head.weight" not in sd
    missing = [k for k in expected if k not in sd and not (tied and k == "language_model.lm_head.weight")]
    problems = [("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", bad_shape)]
    if any(items for _, items in problems):
        msg = "; ".join(f"{what} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                        for what, items in problems if items)
        raise NanovlError(f"checkpoint {path} does not match its config.json: {msg}")
    sd = {**{k: t for k, t in sd.items() if k not in slots}, **fused}
    model.load_state_dict(sd, strict=not tied, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
