"""Load and save InternVL checkpoints as published: the original OpenGVLab layout or transformers' "-hf", one or
many safetensors files.

nanovl's module names are the original keys of a Qwen2-backbone checkpoint, except that the decoder keeps q/k/v
(`qkv_proj`) and gate/up (`gate_up_proj`) stacked in one matrix each (one GEMV per decode step). `parts()` is the
one table between the two key spaces: for every nanovl tensor, the checkpoint tensors that hold it and which of its
rows each one holds. Loading reads every checkpoint tensor straight into those rows; saving and
`original_state_dict()` read the rows back out. InternLM2 renames and groups its q/k/v (`wqkv`), Phi-3 keeps them
fused as nanovl does, -hf renames everything and splits the ViT's qkv too.
"""
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanovl.config import InternVLConfig
from nanovl import limits
from nanovl.errors import NanovlError
from nanovl.files import checkpoint_file, read_json

# nanovl name fragment -> InternLM2's (the original layout of InternLM2 / InternLM3 backbones)
INTERNLM2_NAMES = [
    ("language_model.model.embed_tokens.", "language_model.model.tok_embeddings."),
    ("language_model.lm_head.", "language_model.output."), (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.up_proj.", ".feed_forward.w3."),
    (".mlp.down_proj.", ".feed_forward.w2."), (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
]
# original name fragment -> transformers' InternVLForConditionalGeneration (in order; a fragment without a leading
# "." is a prefix). The inverse of transformers' convert_internvl_weights_to_hf.py.
HF_NAMES = [
    ("vision_model.", "model.vision_tower."), (".encoder.layers.", ".encoder.layer."),
    (".embeddings.class_embedding", ".embeddings.cls_token"),
    (".embeddings.position_embedding", ".embeddings.position_embeddings"),
    (".embeddings.patch_embedding.", ".embeddings.patch_embeddings.projection."),
    (".ls1", ".lambda_1"), (".ls2", ".lambda_2"), (".attn.proj.", ".attention.projection_layer."),
    (".attn.", ".attention."), (".norm1.", ".layernorm_before."), (".norm2.", ".layernorm_after."),
    ("mlp1.0.", "model.multi_modal_projector.layer_norm."), ("mlp1.1.", "model.multi_modal_projector.linear_1."),
    ("mlp1.3.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
]
# transformers 4.52-4.57 wrote the -hf keys without the "model." level: read them as today's names
HF_OLD_PREFIXES = [("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                   ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]
HF_TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                         "phi3": "Phi3ForCausalLM"}
# the decoder's stacked matrices -> the checkpoint matrices they stack, in row order
STACKED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def rename(key: str, table) -> str:
    for a, b in table:
        key = (b + key[len(a):] if key.startswith(a) else key) if not a.startswith(".") else key.replace(a, b)
    return key


def wqkv_rows(llm) -> torch.Tensor:
    """InternLM2's wqkv rows are grouped per KV head, [q_0 .. q_{g-1}, k, v] for each of the n_kv groups: the
    nanovl qkv_proj row ([q heads; k heads; v heads]) that each wqkv row holds."""
    nH, nKV, hd = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    q = torch.arange(nH * hd).view(nKV, -1)  # (n_kv, g*hd): query head h = kv*g + s
    k = nH * hd + torch.arange(nKV * hd).view(nKV, hd)
    return torch.cat([q, k, k + nKV * hd], dim=1).flatten()  # v rows follow the k rows


def rename_table(cfg: InternVLConfig, fmt: str) -> list:
    return HF_NAMES if fmt == "hf" else INTERNLM2_NAMES if cfg.llm_config.arch == "InternLM2ForCausalLM" else []


def parts(key: str, shape, cfg: InternVLConfig, fmt: str) -> list:
    """The checkpoint tensors (format 'original' or 'hf') holding nanovl tensor `key`, each with the rows of `key` it
    holds: None (all of them), a slice, or an index tensor (InternLM2's grouped wqkv)."""
    llm = cfg.llm_config
    stacked = next((s for s in STACKED if f".{s}." in key), None)
    if key.startswith("language_model.") and stacked:
        if llm.arch == "Phi3ForCausalLM":  # Phi-3 stores them stacked, as nanovl does (transformers' Phi3 too)
            out = [(key, None)]
        elif fmt == "original" and llm.arch == "InternLM2ForCausalLM" and stacked == "self_attn.qkv_proj":
            out = [(key.replace("self_attn.qkv_proj", "attention.wqkv"), wqkv_rows(llm))]
        else:
            sizes = llm.qkv_sizes if stacked == "self_attn.qkv_proj" else [llm.intermediate_size] * 2
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            out = [(key.replace(stacked, name), slice(a, a + n)) for name, a, n in zip(STACKED[stacked], starts, sizes)]
    elif fmt == "hf" and key.startswith("vision_model.") and ".attn.qkv." in key:  # -hf splits the ViT's qkv too
        C = shape[0] // 3
        out = [(key.replace(".attn.qkv.", f".attn.{p}_proj."), slice(i * C, (i + 1) * C)) for i, p in enumerate("qkv")]
    else:
        out = [(key, None)]
    return [(rename(k, rename_table(cfg, fmt)), rows) for k, rows in out]


PEFT_PREFIX = re.compile(r"^(language_model|vision_model)\.base_model\.model\.")


def peft_name(key: str) -> tuple[str, str | None]:
    """A key of the original code's unmerged LoRA checkpoints (peft 0.10 names, e.g.
    language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight) -> (the original
    name of the weight it belongs to, None | "A" | "B")."""
    name = PEFT_PREFIX.sub(r"\1.", key).replace(".base_layer.", ".")
    m = re.match(r"(.*)\.lora_([AB])(?:\.default)?\.weight$", name)
    return (m[1] + ".weight", m[2]) if m else (name, None)


@torch.no_grad()
def merge_adapters(model, tensors: dict, scale: float) -> int:
    """W += scale * B @ A for every LoRA pair in `tensors` (original / peft names), into nanovl's rows of W (InternLM2's
    grouped wqkv included), computed in fp32; a tensor that is not a LoRA pair (a trained projector, say) replaces
    the model's. -> the number of merged pairs."""
    pairs, whole = {}, {}
    for k, t in tensors.items():
        name, kind = peft_name(k)
        if kind:
            pairs.setdefault(name, {})[kind] = t
        else:
            whole[name] = t
    table = {ck: (key, rows) for key, t in model.state_dict().items() for ck, rows in parts(key, t.shape, model.config,
                                                                                             "original")}
    for name, t in whole.items():
        if name not in table:
            raise NanovlError(f"adapter file: {name} is no weight of this model")
        key, rows = table[name]
        w = model.get_parameter(key)
        new = w.detach().clone()
        new[slice(None) if rows is None else rows] = t.to(new)
        w.data = new
    for name, ab in pairs.items():
        if name not in table or set(ab) != {"A", "B"}:
            raise NanovlError(f"LoRA weights for {name}: {'no such weight in the model' if name not in table else 'A or B missing'}")
        key, rows = table[name]
        w = model.get_parameter(key)
        merged = w.detach().float().clone()  # a new tensor: w may be memory-mapped
        delta = scale * ab["B"].to(merged) @ ab["A"].to(merged)  # (rows, in)
        if rows is None:
            merged += delta
        else:
            merged[rows] += delta
        w.data = merged.to(w.dtype)
    return len(pairs)


def unbuilt_vit_keys(model) -> dict:
    """The ViT blocks after select_layer, which nanovl does not build: name -> shape, as if they were built."""
    layers, cfg = model.vision_model.encoder.layers, model.config.vision_config
    if not len(layers) or len(layers) == cfg.num_hidden_layers:
        return {}
    block = {k: v.shape for k, v in layers[0].state_dict().items()}
    return {f"vision_model.encoder.layers.{i}.{k}": s for i in range(len(layers), cfg.num_hidden_layers)
            for k, s in block.items()}


# -----------------------------------------------------------------------------
# reading checkpoint files

def weights_dir() -> Path:
    """Where hub checkpoints are downloaded: $NANOVL_WEIGHTS, else weights/ of the nanovl clone (whatever the working
    directory), else ~/.cache/nanovl for an installed package."""
    if os.environ.get("NANOVL_WEIGHTS"):
        return Path(os.environ["NANOVL_WEIGHTS"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    return repo / "weights" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "nanovl"


def resolve(path) -> Path:
    """A local checkpoint directory, or a hub id (e.g. OpenGVLab/InternVL3-1B) downloaded into weights/."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NanovlError(f"{p} is a file: pass the checkpoint directory that holds config.json and *.safetensors")
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)) and not str(path).startswith(("./", "../"))
    if not hub_id or Path(str(path).split("/")[0]).is_dir():  # weights/MyModel: a local path that does not exist
        raise NanovlError(f"no such checkpoint directory: {path}")
    local = weights_dir() / str(path).replace("/", "--")  # owner--name: two owners never share a folder
    if (local / "config.json").exists() and list(local.glob("*.safetensors")):
        return local
    try:
        from huggingface_hub import snapshot_download
        print(f"downloading {path} into {local} ...", file=sys.stderr)
        snapshot_download(repo_id=str(path), local_dir=local,
                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "examples/*"])
    except Exception as e:  # offline, unknown repo, auth: one clear line
        raise NanovlError(f"{path} is not a local directory, and downloading it from the Hugging Face hub failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no network?'}): check "
                          f"the path, or download the checkpoint where there is network and pass its directory") from None
    return local


def read_config(path: Path) -> tuple[InternVLConfig, str]:
    """config.json -> (config, format) where format is 'original' or 'hf'."""
    file = checkpoint_file(path, "config.json")
    if not file.exists():
        raise NanovlError(f"{path} has no config.json: not a checkpoint directory")
    d = read_json(file)
    try:
        if d.get("model_type") != "internvl":
            return InternVLConfig.from_dict(d), "original"
        cfg = InternVLConfig.from_dict(hf_to_original_config(d))
    except NanovlError as e:  # the messages say "config.json: ...": name the file
        raise NanovlError(f"{file}: {str(e).removeprefix('config.json: ')}") from None
    cfg.kept = d.get("internvl_chat") if isinstance(d.get("internvl_chat"), dict) else None  # nanovl.convert's
    return cfg, "hf"


def check_layer_count(cfg: InternVLConfig, path: Path, fmt: str) -> None:
    """Every layer of config.json has tensors in the checkpoint: more layers than the checkpoint has tensors cannot
    load, and would take hours to build."""
    n = len(checkpoint_keys(path, fmt))
    for where, c in (("llm_config", cfg.llm_config), ("vision_config", cfg.vision_config)):
        if c.num_hidden_layers > n:
            raise NanovlError(f"{path / 'config.json'}: {where}.num_hidden_layers is {c.num_hidden_layers:,}, but the "
                              f"checkpoint holds only {n} tensors: config.json and the weights do not belong together")


def hf_to_original_config(d: dict) -> dict:
    """transformers' InternVLConfig -> the original InternVLChatConfig schema."""
    if not isinstance(d.get("vision_config"), dict) or not isinstance(d.get("text_config"), dict):
        raise NanovlError("config.json: an -hf InternVL config needs vision_config and text_config objects")
    v, t = d["vision_config"], dict(d["text_config"])
    first = lambda x: x[0] if isinstance(x, list) and x else x  # noqa: E731  (-hf writes [448, 448])
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.get("hidden_size"),
                  num_hidden_layers=v.get("num_hidden_layers"), num_attention_heads=v.get("num_attention_heads"),
                  intermediate_size=v.get("intermediate_size"), qkv_bias=v.get("attention_bias", False),
                  qk_normalization=v.get("use_qk_norm", False), norm_type=v.get("norm_type", "layer_norm"),
                  layer_norm_eps=v.get("layer_norm_eps", 1e-6), image_size=first(v.get("image_size", 448)),
                  patch_size=first(v.get("patch_size", 14)), num_channels=v.get("num_channels", 3),
                  hidden_act=v.get("hidden_act", "gelu"), drop_path_rate=v.get("drop_path_rate", 0.0),
                  initializer_factor=v.get("layer_scale_init_value", 0.1),
                  initializer_range=v.get("initializer_range", 0.02), use_flash_attn=False)
    if not t.get("architectures"):  # transformers writes null (or nothing) for a sub-config
        t["architectures"] = [HF_TEXT_ARCHITECTURES.get(t.get("model_type"), t.get("model_type"))]
    t.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
    if "dtype" in t:
        t["torch_dtype"] = t.pop("dtype")
    out = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", vision_config=vision, llm_config=t,
               template="internvl2_5", ps_version="v2", select_layer=d.get("vision_feature_layer", -1),
               downsample_ratio=d.get("downsample_ratio", 0.5), force_image_size=vision["image_size"],
               dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
               image_token_id=d.get("image_token_id"), use_backbone_lora=0, use_llm_lora=0,
               torch_dtype=d.get("dtype", d.get("torch_dtype", "bfloat16")))
    kept = d.get("internvl_chat")  # nanovl.convert keeps the original's own fields there (template, ...)
    if isinstance(kept, dict):
        out.update({k: kept[k] for k in ("template", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
                                         "max_dynamic_patch", "system_message") if k in kept})
    return out


STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def safetensors_header(file: Path) -> dict:
    """name -> (dtype, shape, start, end) byte offsets in the file. The format: an 8-byte little-endian header
    length, the JSON header {name: {dtype, shape, data_offsets}}, then the data. Checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise NanovlError(f"{file} is not a safetensors file (or is truncated): header of {n} bytes in a "
                              f"{size}-byte file; download it again")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            out = {}
            for k, v in header.items():
                dtype, shape, (a, b) = v["dtype"], [int(x) for x in v["shape"]], v["data_offsets"]
                numel = math.prod(shape)
                item = STORED_DTYPES[dtype].itemsize if dtype in STORED_DTYPES else None
                if not 0 <= a <= b <= size - 8 - n or (item is not None and b - a != numel * item):
                    raise NanovlError(f"{file}: tensor {k} ({dtype} {shape}) has data offsets {a}..{b}, outside the "
                                      f"file or of the wrong size: the file is truncated or corrupt; download it again")
                out[k] = (dtype, shape, 8 + n + a, 8 + n + b)
        except NanovlError:
            raise
        except Exception as e:  # not JSON, not the schema
            raise NanovlError(f"{file} has a corrupt safetensors header ({type(e).__name__}: {e})") from None
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json (which must stay inside `path`)."""
    index = checkpoint_file(path, "model.safetensors.index.json")
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise NanovlError(f"{index} has no weight_map {{tensor name: shard file}}: the index is corrupt")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or not name.endswith(".safetensors") or name != Path(name).name:
                raise NanovlError(f"{index} names {name!r} as a shard: a shard must be a .safetensors file in {path}")
            f = checkpoint_file(path, name)
            if not f.exists():
                raise NanovlError(f"missing checkpoint shard {f} (listed in {index.name})")
            files.append(f)
        return sorted(files)
    files = [checkpoint_file(path, f.name) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise NanovlError(f"{path} has no *.safetensors files (nanovl reads safetensors checkpoints only)")
    return files


def read_tensors(path: Path, dtype=None, into=lambda key: None, wanted=lambda key: True):
    """Yield (key, tensor) for the checkpoint's tensors with wanted(key), floating ones in `dtype` (None: as stored).
    into(key) may give the tensor to read that key into (its rows of a stacked matrix, a private buffer); otherwise
    a tensor already in `dtype` is memory-mapped (zero copy) and any other is converted into fresh memory. Reads go
    through one reused staging buffer, so no page of a copied tensor stays mapped (peak RSS)."""
    for file in checkpoint_files(path):
        header = safetensors_header(file)
        keys = [k for k in header if wanted(k)]
        bad = [k for k in keys if header[k][0] not in STORED_DTYPES]
        if bad:
            raise NanovlError(f"{file}: tensor {bad[0]} has dtype {header[bad[0]][0]}, which nanovl cannot read")
        target = {k: dtype if dtype is not None and STORED_DTYPES[header[k][0]].is_floating_point
                  else STORED_DTYPES[header[k][0]] for k in keys}
        staging = torch.empty(max((e - s for k, (_, _, s, e) in header.items() if k in target
                                   and target[k] != STORED_DTYPES[header[k][0]]), default=0), dtype=torch.uint8)
        try:
            with safe_open(file, framework="pt") as f, open(file, "rb", buffering=0) as raw:
                for key in keys:
                    stored, shape, start, end = header[key]
                    dest = into(key)
                    if dest is None and target[key] == STORED_DTYPES[stored]:
                        yield key, f.get_tensor(key)  # memory-mapped
                        continue
                    if dest is None or list(dest.shape) != shape or dest.device.type != "cpu":
                        dest = torch.empty(shape, dtype=target[key])  # (a shape mismatch is reported by the caller)
                    direct = dest.dtype == STORED_DTYPES[stored] and dest.is_contiguous()
                    buf = dest.view(-1).view(torch.uint8) if direct else staging[:end - start]
                    raw.seek(start)
                    if raw.readinto(buf.numpy()) != end - start:
                        raise NanovlError(f"{file} is truncated (tensor {key})")
                    yield key, dest if direct else dest.copy_(buf.view(STORED_DTYPES[stored]).view(shape))
        except Exception as e:  # SafetensorError, OSError: a damaged file, named
            if isinstance(e, NanovlError):
                raise
            raise NanovlError(f"cannot read {file}: {type(e).__name__}: {e}") from None


def checkpoint_keys(path: Path, fmt: str) -> set:
    """The tensor names of a checkpoint (headers only), -hf ones in today's naming."""
    keys = {k for f in checkpoint_files(path) for k in safetensors_header(f)}
    return {rename(k, HF_OLD_PREFIXES) for k in keys} if fmt == "hf" else keys


def read_into(path: Path, fmt: str, cfg: InternVLConfig, shapes: dict, dtype, device="cpu",
              private=lambda key: True, strict=True) -> dict:
    """Read the nanovl tensors `shapes` (name -> shape) from checkpoint `path`: {name: tensor}. Each checkpoint tensor
    is read into its rows of a fresh buffer, or memory-mapped where private(name) is False and no conversion is
    needed. strict: every checkpoint tensor must be one of their parts (the ViT blocks after select_layer excepted).
    The headers are checked against `shapes` first: nothing is allocated for a checkpoint that does not fit."""
    table = {ck: (key, rows) for key, shape in shapes.items() for ck, rows in parts(key, shape, cfg, fmt)}
    built = {int(m[1]) for k in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    vit_block = re.compile(r"(?:model\.)?(?:vision_model|vision_tower)\.encoder\.layers?\.(\d+)\.")
    canonical = (lambda ck: rename(ck, HF_OLD_PREFIXES)) if fmt == "hf" else (lambda ck: peft_name(ck)[0])
    out, found, unexpected, bad_shape = {}, {}, [], []

    def expected(name):  # the shape of checkpoint tensor `name`: its rows of the nanovl tensor
        key, rows = table[name]
        n = shapes[key][0] if len(shapes[key]) else 0
        return list(shapes[key]) if rows is None else \
            [len(range(*rows.indices(n))) if isinstance(rows, slice) else len(rows), *shapes[key][1:]]

    for file in checkpoint_files(path):
        for ck, (stored, shape, _, _) in safetensors_header(file).items():
            name = canonical(ck)
            if peft_name(ck)[1]:  # a LoRA A or B: merged after loading (merge_adapters)
                continue
            if name in found:
                raise NanovlError(f"tensor {name} is in both {found[name].name} and {file.name} of {path}: remove "
                                  "the stale file")
            if name in table:
                found[name] = file
                if shape != expected(name):
                    bad_shape.append(f"{name}: checkpoint {tuple(shape)}, config.json says {tuple(expected(name))}")
                if stored in STORED_DTYPES and not STORED_DTYPES[stored].is_floating_point:  # every weight is a float
                    raise NanovlError(f"{file}: tensor {ck} is stored as {stored}, but it is a weight of floating "
                                      "point numbers (F32, F16, BF16): the file is corrupt or not this model's")
            elif strict and not ((m := vit_block.match(ck)) and int(m[1]) >= len(built)):  # a block after select_layer
                unexpected.append(ck)
    missing = [ck for ck in table if ck not in found]
    problems = [("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", bad_shape)]
    if any(items for _, items in problems):
        msg = "; ".join(f"{what} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                        for what, items in problems if items)
        raise NanovlError(f"checkpoint {path} does not match its config.json: {msg}")

    def buffer(key):  # where a stacked, grouped or private tensor is assembled
        if key not in out:
            out[key] = torch.empty(shapes[key], dtype=dtype)
        return out[key]

    def into(ck):
        key, rows = table[canonical(ck)]
        if rows is None:
            return buffer(key) if private(key) else None
        return buffer(key)[rows] if isinstance(rows, slice) else None  # slices of dim 0 are contiguous views

    wanted = lambda ck: not peft_name(ck)[1] and canonical(ck) in table  # noqa: E731
    for ck, t in read_tensors(path, dtype, into, wanted):
        key, rows = table[canonical(ck)]
        if rows is None:
            out.setdefault(key, t)  # memory-mapped, or already read into buffer(key)
        elif isinstance(rows, torch.Tensor):
            buffer(key)[rows] = t
        elif buffer(key)[rows].data_ptr() != t.data_ptr():
            buffer(key)[rows] = t
    return {k: t.to(device) for k, t in out.items()}


def load_weights(model: torch.nn.Module, path: Path, fmt: str, dtype: torch.dtype, device) -> None:
    """Fill a meta-device model from the checkpoint: every tensor accounted for, no second copy kept.
    The decoder's matrices are read into private memory (measured to decode faster than mapped file pages on CPU);
    the ViT and the embedding table stay memory-mapped where the dtype allows. A config that ties the head to the
    embedding keeps them tied only if the checkpoint stores no head of its own (transformers does the same)."""
    cfg, head = model.config, "language_model.lm_head.weight"
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    tied = cfg.llm_config.tie_word_embeddings and not {ck for ck, _ in parts(head, (), cfg, fmt)} & \
        checkpoint_keys(path, fmt)
    if tied:
        del shapes[head]
    private = lambda k: k.startswith("language_model.") and ".embed_tokens." not in k  # noqa: E731
    sd = read_into(path, fmt, cfg, shapes, dtype, device, private)
    model.load_state_dict(sd, strict=not tied, assign=True)
    if tied:  # assign=True replaced the embedding Parameter: the head must be the new one
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    cfg.llm_config.tie_word_embeddings = tied
    model.source = (path, fmt)  # where the ViT blocks after select_layer are, for saving
    if fmt == "original" and any(peft_name(k)[1] for k in checkpoint_keys(path, fmt)):
        # an unmerged LoRA checkpoint of the original code: alpha = 2r, so W + 2 B A (tools/merge_lora.py)
        merge_adapters(model, dict(read_tensors(path, torch.float32, wanted=lambda k: bool(peft_name(k)[1]))), 2.0)
        cfg.raw["use_llm_lora"] = cfg.raw["use_backbone_lora"] = 0


def load_adapters(model, path: Path) -> int:
    """Merge LoRA adapters saved alone (adapter_model.safetensors + adapter_config.json: nanovl.train
    --save-lora-adapters) into a loaded model. -> the number of merged pairs."""
    path = Path(path)
    file, conf = checkpoint_file(path, "adapter_model.safetensors"), checkpoint_file(path, "adapter_config.json")
    if not file.exists() or not conf.exists():
        raise NanovlError(f"{path} has no adapter_model.safetensors and adapter_config.json")
    c = read_json(conf)
    try:
        r, alpha = limits.whole(c.get("r"), "r", 1), limits.number(c.get("lora_alpha"), "lora_alpha")
    except (TypeError, NanovlError) as e:
        raise NanovlError(f"{conf}: {e}") from None
    header = safetensors_header(file)
    try:
        with safe_open(file, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except Exception as e:  # SafetensorError: a damaged file, named
        raise NanovlError(f"cannot read {file}: {type(e).__name__}: {e}") from None
    return merge_adapters(model, tensors, alpha / r)


# -----------------------------------------------------------------------------
# writing the original layout

def original_state_dict(model, grads: bool = False, state_dict: dict | None = None) -> dict:
    """Every tensor of `model` under the ORIGINAL checkpoint's key names, q/k/v and gate/up un-stacked (InternLM2:
    re-grouped into wqkv). grads=True: each parameter's .grad under those names instead (None where it has none).
    state_dict: convert this one (a gathered or merged copy) instead of the model's. Adapters (keys with `.lora_`)
    are not included: nanovl.train.lora names them."""
    out = {}
    params = dict(model.named_parameters())
    for key, t in (state_dict if state_dict is not None else model.state_dict(keep_vars=True)).items():
        if ".lora_" in key:
            continue
        if grads:
            t = params[key].grad if key in params else None
        for ck, rows in parts(key, t.shape if t is not None else params[key].shape, model.config, "original"):
            out[ck] = None if t is None else (t if rows is None else t[rows]).detach()
    return out


def carried_tensors(model, dtype) -> dict:
    """The ViT blocks after select_layer, read from the checkpoint the model was loaded from (nanovl never built
    them, but a saved checkpoint must still hold them for the original code)."""
    extra = unbuilt_vit_keys(model)
    source = getattr(model, "source", None)
    if not extra or source is None:
        return {}
    sd = read_into(source[0], source[1], model.config, extra, dtype, strict=False)
    return {ck: (t if rows is None else t[rows]) for k, t in sd.items()
            for ck, rows in parts(k, t.shape, model.config, "original")}


COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json", "preprocessor_config.json")


def save_pretrained(model, out_dir, dtype: torch.dtype = torch.bfloat16, max_shard_size: int = 5 * 10 ** 9,
                    state_dict: dict | None = None) -> Path:
    """Write `model` as a checkpoint in the original OpenGVLab layout: config.json, safetensors (sharded above
    max_shard_size bytes, with model.safetensors.index.json), and the source checkpoint's tokenizer files,
    generation config and remote-code *.py files, so that nanovl.load and the original code both load it.
    state_dict: write these tensors (nanovl names; e.g. gathered from shards, LoRA merged) instead of the model's."""
    dtype = limits.dtype(dtype)
    limits.whole(max_shard_size, "max_shard_size", 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {**original_state_dict(model, state_dict=state_dict), **carried_tensors(model, dtype)}
    order = sorted(tensors, key=lambda k: (not k.startswith("vision_model."), not k.startswith("language_model."),
                                           _natural(k)))  # the original's module order: ViT, decoder, mlp1
    tensors = {k: tensors[k].to(dtype if tensors[k].is_floating_point() else tensors[k].dtype).contiguous()
               for k in order}
    seen = set()
    for k, t in tensors.items():  # a tied head shares the embedding's memory: safetensors stores each on its own
        tensors[k] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    shards, size = [[]], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    for old in list(out_dir.glob("*.safetensors")) + [out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a shard left from an earlier save would be read as part of this one
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = model.config.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["llm_config"]["torch_dtype"] = config["torch_dtype"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    source = getattr(model, "source", None)
    if source is not None and source[0].resolve() != out_dir.resolve():
        for f in list(COPIED_FILES) + [p.name for p in source[0].glob("*.py")]:
            if (source[0] / f).is_file():
                shutil.copy2(checkpoint_file(source[0], f), out_dir / f)
    return out_dir


def _natural(key: str):
    """Sort key: layer numbers as numbers (layers.2 before layers.10)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]
