"""Tokenizer: the checkpoint's tokenizer rebuilt as one `tokenizers` pipeline giving the ids of the slow HF tokenizer
InternVL uses (transformers 4.x, use_fast=False). Sources, first found wins: tokenizer.json; vocab.json + merges.txt
(Qwen2 byte-level BPE); tokenizer.model (sentencepiece BPE: InternLM2, Phi-3/Llama, Yi) via a tiny protobuf parser."""
import json
import os
import struct

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Tokenizer
from tokenizers.models import BPE

from nanovl.errors import NanovlError
from nanovl.files import checkpoint_file, read_json

FILES = {"json": ("tokenizer.json",), "bpe": ("vocab.json", "merges.txt"), "spm": ("tokenizer.model",)}
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
SPIECE = "\u2581"  # sentencepiece's visible space "▁"
NORMAL, USER_DEFINED, UNUSED = 1, 4, 5  # sentencepiece piece types


def _json(path, name):  # {} when the file does not exist
    return read_json(checkpoint_file(path, name), default={})


def _content(t):  # tokenizer_config writes a token as a string or as an AddedToken dict
    return t.get("content") if isinstance(t, dict) else t


def _spec(i, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False, **_):  # added token
    return dict(id=i, special=special, normalized=normalized, lstrip=lstrip, rstrip=rstrip, single_word=single_word)


def _fields(b):
    """Yield (field number, value) of one protobuf message: an int for varints, bytes for everything else."""
    def varint(i):
        x = shift = 0
        while b[i] & 0x80:
            x, i, shift = x | (b[i] & 0x7F) << shift, i + 1, shift + 7
        return x | b[i] << shift, i + 1
    i = 0
    while i < len(b):
        key, i = varint(i)  # wire types: 0 varint, 2 length-delimited, 1 fixed64, 5 fixed32
        n, i = varint(i) if key & 7 in (0, 2) else ({1: 8, 5: 4}[key & 7], i)
        v, i = (n, i) if key & 7 == 0 else (b[i:i + n], i + n)
        yield key >> 3, v


def _read_spm(file):
    """ModelProto -> pieces [(piece, score, type)], trainer_spec {field: value}, normalizer_spec {field: value}."""
    pieces, specs = [], {2: {}, 3: {}}
    for f, v in _fields(file.read_bytes()):
        if f == 1:  # SentencePiece {1 piece, 2 score: float, 3 type}
            p = dict(_fields(v))
            pieces.append((p.get(1, b"").decode(), struct.unpack("<f", p[2])[0] if 2 in p else 0.0, p.get(3, NORMAL)))
        elif f in specs:
            specs[f] = dict(_fields(v))
    return pieces, specs[2], specs[3]


def _spm_merges(names, pieces):
    """BPE merges from sentencepiece scores: every split of a normal piece, the higher the piece's score the earlier."""
    vocab = {p: i for i, p in enumerate(names)}
    cands = sorted((-score, i, vocab[p[:j]], vocab[p[j:]]) for i, (p, score, typ) in enumerate(pieces)
                   if typ == NORMAL and names[i] == p for j in range(1, len(p)) if p[:j] in vocab and p[j:] in vocab)
    return [(names[a], names[b]) for _, _, a, b in cands]


def _from_spm(path, added, cfg):
    file = checkpoint_file(path, "tokenizer.model")
    pieces, trainer, norm = _read_spm(file)
    if trainer.get(3, 1) != 2 or norm.get(4, 1):  # model_type BPE; remove_extra_whitespaces is not supported
        raise NanovlError(f"{file}: only sentencepiece BPE models without remove_extra_whitespaces are supported")
    # an unused piece is never produced by sentencepiece (its text goes to byte fallback): keep its id, not its text;
    # with byte fallback, sentencepiece also treats a piece "\0" as unused (sentencepiece_processor.cc)
    fallback = bool(trainer.get(35, 0))
    names = [f"<unused_piece_{i}>" if typ == UNUSED or (p == "\0" and fallback) else p
             for i, (p, _, typ) in enumerate(pieces)]
    for c, a in sorted(added.items(), key=lambda kv: kv[1]["id"]):  # added tokens replace the pieces at their ids
        names += [f"<unused_{k}>" for k in range(len(names), a["id"] + 1)]
        names[a["id"]] = c
    for i, (p, _, typ) in enumerate(pieces):  # user-defined pieces are atoms, matched on the normalized text
        if typ == USER_DEFINED and names[i] == p:
            added.setdefault(p, _spec(i, special=False, normalized=True))
    tok = _Tokenizer(BPE({p: i for i, p in enumerate(names)}, _spm_merges(names, pieces),
                         unk_token=names[trainer.get(40, 0)], fuse_unk=True, byte_fallback=bool(trainer.get(35, 0))))
    seq = [normalizers.Precompiled(norm[2])] if norm.get(2) else []
    if norm.get(3, 1) and cfg.get("legacy") is not False:  # add_dummy_prefix: every span gets one, as in the slow one
        seq.append(normalizers.Prepend(SPIECE))
    tok.normalizer = normalizers.Sequence(seq + [normalizers.Replace(" ", SPIECE)])
    strip = norm.get(3, 1) or "Llama" in cfg.get("tokenizer_class", "")  # slow decode drops the first prefix space
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * bool(strip))
    return tok


def _from_bpe(path, added, cfg):
    """Qwen2 byte-level BPE, as transformers' Qwen2 conversion builds it (merges.txt kept as is, quirks included)."""
    vocab = {**_json(path, "vocab.json"), **{c: a["id"] for c, a in added.items()}}
    file = checkpoint_file(path, "merges.txt")
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise NanovlError(f"cannot read {file}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None
    merges = [tuple(l.split()) for k, l in enumerate(lines) if l.strip() and not (k == 0 and l.startswith("#version"))]
    tok = _Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _drop_prefix(node):
    """legacy=False: encode() adds the one dummy "▁" itself, so take per-span prefixing out of a tokenizer.json."""
    if isinstance(node, dict) and "normalizers" in node:
        node["normalizers"] = [n for n in map(_drop_prefix, node["normalizers"]) if n]
    if isinstance(node, dict) and node.get("type") == "Metaspace":
        node.update({k: v for k, v in (("prepend_scheme", "never"), ("add_prefix_space", False)) if k in node})
    return None if isinstance(node, dict) and node.get("type") == "Prepend" else node


def _from_json(path, added, cfg):
    j = _json(path, "tokenizer.json")
    if isinstance(j["model"].get("vocab"), dict):  # added tokens keep their ids, whatever order they come in
        j["model"]["vocab"].update({c: a["id"] for c, a in added.items()})
    if cfg.get("legacy") is False:
        j["normalizer"], j["pre_tokenizer"] = _drop_prefix(j.get("normalizer")), _drop_prefix(j.get("pre_tokenizer"))
    return _Tokenizer.from_str(json.dumps(j))


class Tokenizer:
    def __init__(self, path):
        """Build from the tokenizer files in folder `path`; files of the wrong form are a NanovlError naming them."""
        path = str(path)
        try:
            self._build(path)
        except NanovlError:
            raise
        except Exception as e:  # a file of the wrong structure (KeyError, TypeError, the tokenizers library's errors)
            used = " + ".join(FILES.get(getattr(self, "kind", None), ()))
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            raise NanovlError(f"cannot build the tokenizer from {used} and the tokenizer config files in {path} "
                              f"({type(e).__name__}: {detail}): they are damaged or of a form nanovl does not "
                              "know") from None

    def _build(self, path):
        kind = next((k for k, fs in FILES.items() if all(os.path.isfile(os.path.join(path, f)) for f in fs)), None)
        self.kind = kind
        if kind is None:
            raise NanovlError(f"no tokenizer in {path}: looked for tokenizer.json, vocab.json + merges.txt, "
                              "tokenizer.model")
        cfg = {**_json(path, "special_tokens_map.json"), **_json(path, "tokenizer_config.json")}
        if kind == "spm":  # LlamaTokenizer / InternLM2Tokenizer defaults
            cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **cfg}
        added = {t["content"]: _spec(int(i), **t) for i, t in cfg.get("added_tokens_decoder", {}).items()}
        for c, i in _json(path, "added_tokens.json").items():  # InternVL adds its tokens with special_tokens=True
            added.setdefault(c, _spec(i))
        tok = {"json": _from_json, "bpe": _from_bpe, "spm": _from_spm}[kind](path, added, cfg)
        # the slow tokenizer always matches, and skips on decode, bos/eos/unk/pad and the additional special tokens
        special = [_content(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        special = [c for c in special + [_content(t) for t in cfg.get("additional_special_tokens", [])]
                   if c is not None and (c in added or tok.token_to_id(c) is not None)]
        for c in special:
            added.setdefault(c, _spec(tok.token_to_id(c)))["special"] = True
        for flag, add in ((True, tok.add_special_tokens), (False, tok.add_tokens)):
            add([AddedToken(c, **{k: v for k, v in a.items() if k != "id"})
                 for c, a in sorted(added.items(), key=lambda kv: kv[1]["id"]) if a["special"] == flag])
        for c, a in added.items():
            if tok.token_to_id(c) != a["id"]:
                raise NanovlError(f"{path}: added token {c!r} got id {tok.token_to_id(c)}, "
                                  f"the tokenizer files say {a['id']}")
        self._tok, self.special_ids = tok, {added[c]["id"] for c in special}
        tid = lambda k: tok.token_to_id(_content(cfg[k])) if cfg.get(k) else None  # noqa: E731
        self.bos_token_id, self.eos_token_id, self.pad_token_id = tid("bos_token"), tid("eos_token"), tid("pad_token")
        self.bos_token = _content(cfg.get("bos_token"))
        # BOS: sentencepiece classes default to add_bos_token=True, Qwen2 has none, a tokenizer.json may add it itself
        bos_default = {"bpe": False, "spm": True}.get(kind, tok.encode("").ids[:1] == [self.bos_token_id])
        self.add_bos = bool(cfg.get("add_bos_token", bos_default)) and self.bos_token_id is not None
        self.add_eos = bool(cfg.get("add_eos_token", False)) and self.eos_token_id is not None
        # LlamaTokenizer legacy=False: one "▁" before the whole text, dropped again when a special token follows it
        self.space_id = tok.token_to_id(SPIECE)
        self.prefix_once = cfg.get("legacy") is False and cfg.get("add_prefix_space", True)
        self._len = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.prefix_once and text:
            text = SPIECE + text.replace(SPIECE, " ")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.prefix_once and len(ids) > 1 and ids[0] == self.space_id and ids[1] in self.special_ids:
            ids = ids[1:]
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos + ids + [self.eos_token_id] * self.add_eos
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._len
