"""Convert a checkpoint between the original OpenGVLab layout and transformers' "-hf" layout, tensor by tensor.

    python -m nanovl.convert SRC DST --to hf|original [--dtype bf16|fp16|fp32] [--merge-lora] [--max-shard-size 5GB]

Every tensor goes through the table loading and saving use (weights.parts): read from SRC into nanovl's rows, cut
into DST's names. One shard is in memory at a time. An unmerged LoRA checkpoint of the original code is merged
(W + 2 B A) with --merge-lora. The -hf output is what transformers' convert_internvl_weights_to_hf.py writes
(InternLM2 becomes Llama), plus the original fields transformers has no place for, under "internvl_chat", so
that converting back gives the original config.json again.
"""
import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

from nanovl.errors import NanovlError, ctrl_c_exits

with ctrl_c_exits(active=__name__ == "__main__"):  # python -m nanovl.convert: Ctrl-C while torch imports
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nanovl.template import IMG_CONTEXT, IMG_END, IMG_START
    from nanovl.weights import (COPIED_FILES, HF_OLD_PREFIXES, checkpoint_files, parts, peft_name, read_config,
                                rename, resolve, safetensors_header)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the chat template transformers' converter gives every -hf InternVL (the internvl2_5 turn format)
HF_CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content']"
                    " is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if "
                    "content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n'"
                    " }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
                    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}"
                    "{% endif %}")
HF_TEXT = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
           "InternLM2ForCausalLM": "llama", "Phi3ForCausalLM": "phi3"}


def hf_config(cfg, image_token_id: int, dtype: str) -> dict:
    """The config.json of transformers' InternVLConfig for this model (the converter's field mapping)."""
    check_hf(cfg)
    v, lm = cfg.vision_config, cfg.llm_config
    drop = {"architectures", "auto_map", "bias", "use_bfloat16", "_name_or_path", "attn_implementation",
            "_attn_implementation", "torch_dtype", "rope_parameters"}
    text = {k: val for k, val in cfg.llm_config.raw.items() if k not in drop}
    text.update(model_type=HF_TEXT[lm.arch], architectures=None, hidden_size=lm.hidden_size,
                num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
                num_key_value_heads=lm.num_key_value_heads, intermediate_size=lm.intermediate_size,
                vocab_size=lm.vocab_size, rms_norm_eps=lm.rms_norm_eps, max_position_embeddings=lm.max_position_embeddings,
                tie_word_embeddings=lm.tie_word_embeddings, rope_theta=lm.rope_theta, rope_scaling=lm.rope_scaling,
                rope_parameters={"rope_type": "default", **{k: val for k, val in (lm.rope_scaling or {}).items()
                                                           if k != "type"}, "rope_theta": lm.rope_theta}, dtype=dtype)
    rope = text["rope_parameters"]
    if lm.rope_scaling and "type" in lm.rope_scaling and "rope_type" not in lm.rope_scaling:
        rope["rope_type"] = lm.rope_scaling["type"]
    if rope["rope_type"] in ("su", "longrope"):  # Phi-3: transformers calls it longrope, with this key inside
        rope.update(rope_type="longrope", original_max_position_embeddings=lm.original_max_position_embeddings)
    if text["rope_scaling"]:  # the same, in transformers 4's spelling
        text["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    if lm.arch in ("InternLM2ForCausalLM", "LlamaForCausalLM"):
        text.update(attention_bias=lm.o_bias, mlp_bias=False, head_dim=lm.head_dim)
    if lm.arch == "Qwen3ForCausalLM":
        text.update(head_dim=lm.head_dim, attention_bias=lm.attention_bias)
    vision = dict(model_type="internvl_vision", hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                  attention_bias=v.qkv_bias, use_qk_norm=v.qk_normalization, norm_type=v.norm_type,
                  layer_norm_eps=v.layer_norm_eps, hidden_act=v.raw.get("hidden_act", "gelu"),
                  image_size=[cfg.image_size] * 2, patch_size=[v.patch_size] * 2, num_channels=v.num_channels,
                  layer_scale_init_value=v.initializer_factor, use_mean_pooling=True,
                  use_absolute_position_embeddings=True, attention_dropout=0.0, projection_dropout=0.0, dtype=dtype)
    return dict(architectures=["InternVLForConditionalGeneration"], model_type="internvl", text_config=text,
                vision_config=vision, image_token_id=image_token_id, image_seq_length=cfg.num_image_token,
                downsample_ratio=cfg.downsample_ratio, projector_hidden_act="gelu",
                vision_feature_layer=cfg.select_layer, vision_feature_select_strategy="default",
                tie_word_embeddings=lm.tie_word_embeddings, dtype=dtype,
                internvl_chat=original_config(cfg, dtype))  # what -hf has no field for (template, InternLM2, ...)


def check_hf(cfg) -> None:
    """What transformers' InternVL cannot express, refused before anything is written."""
    if cfg.ps_version != "v2":
        raise NanovlError("transformers' InternVL always does the ps_version 'v2' pixel shuffle: a ps_version v1 "
                          "checkpoint (InternVL-Chat-V1-1/V1-2) cannot be written as -hf")
    if cfg.llm_config.arch not in HF_TEXT:
        raise NanovlError(f"transformers' InternVL has no text model for {cfg.llm_config.arch}")
    if cfg.flash_mode is not None:
        raise NanovlError("an InternVL3.5-Flash checkpoint (router, mlp2) has no -hf form in transformers' InternVL: "
                          "keep it in the original layout")


def original_config(cfg, dtype: str) -> dict:
    """config.json of the original InternVLChatModel (auto_map for its remote code, which must be copied in); for
    an -hf checkpoint nanovl wrote, the original config it kept under "internvl_chat"."""
    kept = getattr(cfg, "kept", None)
    d = json.loads(json.dumps(kept)) if kept else cfg.to_dict()
    d.update(architectures=["InternVLChatModel"], model_type="internvl_chat", torch_dtype=dtype, use_llm_lora=0,
             use_backbone_lora=0)
    d["llm_config"]["torch_dtype"] = dtype
    d.setdefault("auto_map", {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                              "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                              "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"})
    return d


def convert(src, dst, to: str = "hf", dtype: str | None = None, merge_lora: bool = False,
            max_shard_size: int = 5 * 10 ** 9, progress=None) -> Path:
    """SRC checkpoint (either layout) -> DST in layout `to`; dtype None keeps each tensor's stored dtype."""
    from nanovl.model import InternVL

    if to not in ("hf", "original"):
        raise NanovlError(f"--to must be hf or original, got {to!r}")
    src, dst = resolve(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise NanovlError("the destination is the source directory: give another one")
    cfg, fmt = read_config(src)
    if to == "hf":
        check_hf(cfg)
    out_cfg = cfg  # whose names DST gets: an -hf checkpoint nanovl wrote keeps its original (InternLM2, say)
    if to == "original" and getattr(cfg, "kept", None):
        from nanovl.config import InternVLConfig
        out_cfg = InternVLConfig.from_dict(cfg.kept)
    with torch.device("meta"):
        model = InternVL(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    n = len(model.vision_model.encoder.layers)  # ViT blocks after select_layer: converted too, nothing is lost
    block = {k.split(".", 4)[4]: v for k, v in shapes.items() if k.startswith("vision_model.encoder.layers.0.")}
    shapes.update({f"vision_model.encoder.layers.{i}.{k}": s for i in range(n, cfg.vision_config.num_hidden_layers)
                   for k, s in block.items()})
    where, lora = {}, {}
    for f in checkpoint_files(src):
        for k in safetensors_header(f):
            name, kind = peft_name(k) if fmt == "original" else (rename(k, HF_OLD_PREFIXES), None)
            (lora.setdefault(name, {}).__setitem__(kind, (f, k)) if kind else where.__setitem__(name, (f, k)))
    if lora and not merge_lora:
        raise NanovlError(f"{src} holds unmerged LoRA adapters (the original code's use_llm_lora / use_backbone_lora):"
                          " add --merge-lora to write W + 2 B A")
    head = parts("language_model.lm_head.weight", (), cfg, fmt)[0][0]
    if cfg.llm_config.tie_word_embeddings and head not in where:
        shapes.pop("language_model.lm_head.weight")
    image_token_id = _image_token_id(src, cfg)
    files, out, size, written, total_bytes = {}, {}, 0, [], 0
    dst.mkdir(parents=True, exist_ok=True)
    for old in list(dst.glob("*.safetensors")) + [dst / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)

    def flush():
        nonlocal out, size
        if out:
            name = f"part-{len(written):05d}.tmp.safetensors"
            save_file(out, str(dst / name), metadata={"format": "pt"})
            written.append((name, list(out)))
            out, size = {}, 0

    def read(f, k):
        if f not in files:
            files[f] = safe_open(f, framework="pt")
        return files[f].get_tensor(k)

    missing = []
    for i, (key, shape) in enumerate(shapes.items()):
        buf = None
        for ck, rows in parts(key, shape, cfg, fmt):
            if ck not in where:
                missing.append(ck)
                continue
            t = read(*where[ck])
            if ck in lora:  # W + alpha/r B A, alpha = 2r (the original's wrap_*_lora)
                a, b = (read(*lora[ck][x]).float() for x in ("A", "B"))
                t = (t.float() + 2.0 * b @ a).to(t.dtype)
            if rows is None:
                buf = t
            else:
                buf = buf if buf is not None else torch.empty(shape, dtype=t.dtype)
                buf[rows] = t
        if buf is None:
            continue
        for ck, rows in parts(key, shape, out_cfg, to):
            t = (buf if rows is None else buf[rows]).contiguous()
            t = t.to(DTYPES[dtype]) if dtype and t.is_floating_point() else t
            if size and size + t.numel() * t.element_size() > max_shard_size:
                flush()
            out[ck] = t.clone() if rows is not None or t.data_ptr() == buf.data_ptr() else t
            size += t.numel() * t.element_size()
            total_bytes += t.numel() * t.element_size()
        if progress:
            progress(i + 1, len(shapes))
    if missing:
        raise NanovlError(f"{src} lacks {len(missing)} tensor(s) its config.json needs: {', '.join(missing[:5])}")
    flush()
    names = ["model.safetensors"] if len(written) == 1 else \
        [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for (tmp, _), name in zip(written, names):
        (dst / tmp).rename(dst / name)
    if len(written) > 1:
        index = {"metadata": {"total_size": total_bytes},
                 "weight_map": {k: name for (_, keys), name in zip(written, names) for k in keys}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    stored = dtype or _stored_dtype(src, cfg)
    config = hf_config(cfg, image_token_id, stored) if to == "hf" else original_config(out_cfg, stored)
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _copy_side_files(src, dst, to, fmt, cfg)
    return dst


def _image_token_id(src: Path, cfg) -> int:
    from nanovl.tokenizer import Tokenizer
    try:
        tid = Tokenizer(src).token_to_id(IMG_CONTEXT)
    except NanovlError:
        tid = None
    if tid is None and cfg.image_token_id is None:
        raise NanovlError(f"{src} has no tokenizer with {IMG_CONTEXT} and no image_token_id: cannot write the -hf "
                          "image token")
    return tid if tid is not None else cfg.image_token_id


def _stored_dtype(src: Path, cfg) -> str:
    header = safetensors_header(checkpoint_files(src)[0])
    kinds = {v[0] for v in header.values()}
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(next(iter(sorted(kinds))), "bfloat16")


def _copy_side_files(src: Path, dst: Path, to: str, fmt: str, cfg) -> None:
    """Tokenizer and generation files; for -hf also the tokenizer's image tokens, the chat template and the
    processor files transformers' InternVLProcessor reads; remote code only to the original layout."""
    for f in COPIED_FILES + tuple(p.name for p in src.glob("*.py")):
        if (src / f).is_file() and not (to == "hf" and f.endswith(".py")):
            shutil.copy2(src / f, dst / f)
    if to != "hf":
        return
    tc = dst / "tokenizer_config.json"
    conf = json.loads(tc.read_text(encoding="utf-8")) if tc.exists() else {}
    conf["extra_special_tokens"] = {"start_image_token": IMG_START, "end_image_token": IMG_END,
                                    "context_image_token": IMG_CONTEXT}
    conf["chat_template"] = HF_CHAT_TEMPLATE  # as transformers' converter sets it
    tc.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    size = cfg.image_size
    (dst / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="GotOcr2ImageProcessorFast", processor_class="InternVLProcessor", do_resize=True,
        size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True, resample=3,
        crop_to_patches=False, min_patches=cfg.min_dynamic_patch, max_patches=cfg.max_dynamic_patch), indent=2) + "\n")
    (dst / "processor_config.json").write_text(json.dumps(dict(
        processor_class="InternVLProcessor", image_seq_length=cfg.num_image_token), indent=2) + "\n")


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip().upper())
    if not m:
        raise NanovlError(f"--max-shard-size must look like 5GB, 500MB or 1000000, got {text!r}")
    return int(float(m[1]) * {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}[m[2]])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanovl.convert", description="Convert an InternVL checkpoint between "
                                "the original OpenGVLab layout and transformers' -hf layout.")
    p.add_argument("src", help="checkpoint directory (or hub id)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "original"), required=True)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: as stored")
    p.add_argument("--merge-lora", action="store_true", help="merge an unmerged LoRA checkpoint of the original code")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    try:
        last = [-1]

        def progress(i, n):
            pct = i * 100 // n
            if pct != last[0] and sys.stderr.isatty():
                print(f"\rconverting: {pct}% ({i}/{n} tensors)", end="\n" if i == n else "", file=sys.stderr,
                      flush=True)
                last[0] = pct
        out = convert(args.src, args.dst, args.to, args.dtype, args.merge_lora, _bytes(args.max_shard_size), progress)
        print(f"wrote {out} ({args.to} layout)", file=sys.stderr)
    except NanovlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
