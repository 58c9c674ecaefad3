"""The chat templates: how a conversation becomes a prompt (inference) and which of its tokens are learned (training),
defined once per template, as the original InternVL code does (internvl/conversation.py and the preprocess_*
functions of internvl/train/dataset.py).

    prompt = build_prompt(TEMPLATES["internvl2_5"], system, history, question)       # chat / generate
    ids, labels = tokenize_conversation("internvl2_5", tokenizer, turns, [256 * 7])  # fine-tuning
"""
from dataclasses import dataclass

from nanovl.errors import NanovlError

SYSTEM_INTERNVL = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
IGNORE = -100  # a label that is not learned
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclass(frozen=True)
class Template:
    """The reference's SeparatorStyle.MPT: system + sep, then role + message + sep per turn, then the open role."""
    system: str  # formatted with the system message
    user: str
    assistant: str
    sep: str  # sep.strip() is also the stop token
    default_system: str
    labels: str  # how training decides the learned tokens: "segments" (internvl2_5) or the legacy offset walk


_CHATML = dict(system="<|im_start|>system\n{}", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n")
TEMPLATES = {
    "Hermes-2": Template(**_CHATML, sep="<|im_end|>", default_system=SYSTEM_INTERNVL, labels="mpt"),
    "internlm2-chat": Template(**_CHATML, sep="<|im_end|>", default_system=SYSTEM_INTERNVL, labels="internlm"),
    "internvl2_5": Template(**_CHATML, sep="<|im_end|>\n", default_system=SYSTEM_INTERNVL2_5, labels="segments"),
    "phi3-chat": Template("<|system|>\n{}", "<|user|>\n", "<|assistant|>\n", "<|end|>", SYSTEM_INTERNVL, "phi3"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise NanovlError(f"unsupported chat template {name!r}; nanovl knows {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# -----------------------------------------------------------------------------
# inference: a prompt ending with the open assistant turn

def build_prompt(template: Template, system: str, history, question: str) -> str:
    """history: [(question, answer), ...] of earlier turns."""
    t = template
    prompt = t.system.format(system) + t.sep
    for q, a in history:
        prompt += t.user + q + t.sep + t.assistant + a + t.sep
    return prompt + t.user + question + t.sep + t.assistant


def image_tokens(n: int) -> str:
    """What one <image> becomes: <img> + n <IMG_CONTEXT> + </img> (n = 256 per tile)."""
    return IMG_START + IMG_CONTEXT * n + IMG_END


def expand_images(prompt: str, num_patches_list, num_image_token: int) -> str:
    """Each <image>, left to right, becomes <img> + <IMG_CONTEXT> x (num_image_token * tiles) + </img>."""
    n = prompt.count("<image>")
    if n != len(num_patches_list):
        raise NanovlError(f"the prompt has {n} <image> placeholder(s) but {len(num_patches_list)} image(s) were given")
    for tiles in num_patches_list:
        prompt = prompt.replace("<image>", image_tokens(num_image_token * tiles), 1)
    return prompt


# -----------------------------------------------------------------------------
# training: input ids and labels of a whole conversation, exactly as the original preprocess_* functions

def tokenize_conversation(template_name: str, tokenizer, turns: list, image_token_counts: list,
                          max_seq_length: int = 8192, text_only: bool = False) -> tuple[list, list, str | None]:
    """turns: [{"from": "system"|"human"|"gpt", "value": str}, ...] (the original JSONL schema);
    image_token_counts: <IMG_CONTEXT> tokens of each image in order (256 x its tiles), text_only: leave <image> as text.
    -> (input_ids, labels, warning): labels are IGNORE where not learned; warning is the original's "tokenization
    mismatch" (every label IGNORE: the sample teaches nothing), else None. Truncated to max_seq_length."""
    template = get_template(template_name)
    system = template.default_system
    if turns and turns[0].get("from") == "system":  # the legacy templates raise KeyError here; nanovl uses it
        system, turns = turns[0]["value"], turns[1:]
    for i, t in enumerate(turns):
        if t.get("from") not in ("human", "gpt"):
            raise NanovlError(f"turn {i + 1} has role {t.get('from')!r}: only a first 'system' turn, then 'human' "
                              "and 'gpt' turns are supported")
    if template.labels == "segments":
        return _segments(template, tokenizer, system, turns, image_token_counts, max_seq_length, text_only)
    return _legacy(template, tokenizer, system, turns, image_token_counts, max_seq_length, text_only)


def _expand_human(turns, counts) -> list:
    """internvl2_5: the <image>s of the human turns, left to right, become the image blocks; exactly len(counts)."""
    out, k = [], 0
    for t in turns:
        v = t["value"]
        if t["from"] == "human":
            while "<image>" in v and k < len(counts):
                v, k = v.replace("<image>", image_tokens(counts[k]), 1), k + 1
        out.append({"from": t["from"], "value": v})
    if k != len(counts):
        raise NanovlError(f"the human turns have {k} <image> placeholder(s) for {len(counts)} image(s)")
    return out


def _segments(template, tok, system, turns, counts, max_len, text_only):
    """preprocess_internvl2_5: each turn is tokenized on its own and the ids concatenated (no BPE merge crosses a
    turn). Learned: each answer and its <|im_end|>; not the '<|im_start|>assistant\\n' header, nor the '\\n' after."""
    if not text_only:
        turns = _expand_human(turns, counts)
    texts = [template.system.format(system) + template.sep]
    roles = ["system"] + [t["from"] for t in turns]
    texts += [(template.user if t["from"] == "human" else template.assistant) + t["value"] + template.sep
              for t in turns]
    if tok.add_bos:  # InternLM2: one BOS for the whole sample (the original prepends it as text, then drops the
        texts[0] = tok.bos_token + texts[0]  # tokenizer's own BOS from every segment)
    ids = [tok.encode(t)[1:] if tok.add_bos else tok.encode(t) for t in texts]
    header = len(tok.encode(template.assistant)) - tok.add_bos
    input_ids, labels = [], []
    for role, seg in zip(roles, ids):
        input_ids += seg
        if role == "gpt":
            labels += [IGNORE] * header + seg[header:-1] + [IGNORE]
        else:
            labels += [IGNORE] * len(seg)
    return input_ids[:max_len], labels[:max_len], None


def _legacy(template, tok, system, turns, counts, max_len, text_only):
    """preprocess_mpt (Hermes-2), preprocess_phi3 and preprocess_internlm (internlm2-chat): the whole prompt is
    tokenized at once, then the learned spans are found by re-tokenizing pieces and counting. When the count does not
    reach the prompt's length, the original masks every label (its "tokenization mismatch" warning)."""
    if template.labels == "internlm":  # preprocess_internlm strips every value
        turns = [{**t, "value": t["value"].strip()} for t in turns]
    if turns and turns[0]["from"] != "human":  # the original skips a first turn that is not the user's
        turns = turns[1:]
    for j, t in enumerate(turns):
        if t["from"] != ("human", "gpt")[j % 2]:
            raise NanovlError(f"turn {j + 1} is {t['from']!r}: the {template.labels} template needs human and gpt "
                              "turns in alternation")
    if turns and turns[-1]["from"] == "human":  # internlm2-chat's walk would learn that user turn, the others mask all
        raise NanovlError("the conversation ends with a human turn: the original's preprocess for this template "
                          "then learns the user's text (internlm2-chat) or nothing at all (Hermes-2, phi3-chat)")
    prompt = template.system.format(system) + template.sep
    for t in turns:  # Conversation.get_prompt, MPT style: an empty message leaves the role open
        role = template.user if t["from"] == "human" else template.assistant
        prompt += role + t["value"] + template.sep if t["value"] else role
    if not text_only:  # (an answer's <image> comes after the placeholders data.py counted: it stays text)
        if prompt.count("<image>") < len(counts):
            raise NanovlError(f"the conversation has {prompt.count('<image>')} <image> placeholder(s) for "
                              f"{len(counts)} image(s)")
        for n in counts:  # the first len(counts) placeholders anywhere in the prompt, system text included
            prompt = prompt.replace("<image>", image_tokens(n), 1)
    ids = tok.encode(prompt)[:max_len]
    labels = list(ids)
    n = lambda text: len(tok.encode(text))  # noqa: E731  (with the tokenizer's BOS, as the original counts)
    total = sum(i != tok.pad_token_id for i in ids)

    def ignore(a, b):
        labels[a:b] = [IGNORE] * len(labels[a:b])

    if template.labels == "internlm":
        pieces = prompt.split(template.assistant)
        cur = 1
        ignore(0, 1)  # <s>
        k = n(pieces[0] + template.assistant) - 1
        ignore(cur, cur + k)
        cur += k
        for piece in pieces[1:-1]:
            if piece.count(template.user) != 1:  # the original fails here too (a ValueError)
                raise NanovlError(f"a turn contains the template's own {template.assistant!r} or {template.user!r} "
                                  "text, which the internlm2-chat preprocess cannot take apart")
            answer, user = piece.split(template.user)
            cur += n(answer) - 1
            k = n(template.user + user + template.assistant) - 1
            ignore(cur, cur + k)
            cur += k
        cur += n(pieces[-1]) - 1
    else:  # mpt (Hermes-2) and phi3: per (system +) user + answer round
        sep = template.sep + template.assistant
        split = prompt.split(template.sep)
        rounds = [template.sep.join(split[:3])] + [template.sep.join(split[i:i + 2]) for i in range(3, len(split), 2)]
        phi3 = template.labels == "phi3"
        cur = 1 if phi3 else 0
        ignore(0, cur)
        if phi3:
            endoftext = tok.token_to_id("<|endoftext|>")
            labels = [IGNORE if i == endoftext else i for i in labels]
        for i, r in enumerate(rounds):
            if r == "":
                break
            r_len = n(r) + 1 if not phi3 else n(r) - (i > 0)
            halves = r.split(sep)
            if len(halves) != 2:
                break
            k = n(halves[0] + sep) - (phi3 and (1 if i == 0 else 2))
            ignore(cur, cur + k)
            cur += r_len
    ignore(cur, len(labels))
    if cur < max_len and cur != total:
        return ids, [IGNORE] * len(ids), f"tokenization mismatch: {cur} vs. {total} (every label masked)"
    return ids, labels, None
