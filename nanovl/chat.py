"""Conversation templates, <image> expansion and the chat()/stream()/batch_chat() API of the reference."""
import time
from dataclasses import dataclass

import torch

from nanovl import generation
from nanovl.errors import NanovlError

SYSTEM_INTERNVL = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_INTERNVL2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class Template:
    """The reference's SeparatorStyle.MPT: system + sep, then role + message + sep per turn, then the open role."""
    system: str  # formatted with the system message
    user: str
    assistant: str
    sep: str  # sep.strip() is also the stop token
    default_system: str


_CHATML = dict(system="<|im_start|>system\n{}", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n")
TEMPLATES = {
    "Hermes-2": Template(**_CHATML, sep="<|im_end|>", default_system=SYSTEM_INTERNVL),
    "internlm2-chat": Template(**_CHATML, sep="<|im_end|>", default_system=SYSTEM_INTERNVL),
    "internvl2_5": Template(**_CHATML, sep="<|im_end|>\n", default_system=SYSTEM_INTERNVL2_5),
    "phi3-chat": Template("<|system|>\n{}", "<|user|>\n", "<|assistant|>\n", "<|end|>", SYSTEM_INTERNVL),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise NanovlError(f"unsupported chat template {name!r}; nanovl knows {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def build_prompt(template: Template, system: str, history, question: str) -> str:
    """history: [(question, answer), ...] of earlier turns."""
    t = template
    prompt = t.system.format(system) + t.sep
    for q, a in history:
        prompt += t.user + q + t.sep + t.assistant + a + t.sep
    return prompt + t.user + question + t.sep + t.assistant


def expand_images(prompt: str, num_patches_list, num_image_token: int) -> str:
    """Each <image>, left to right, becomes <img> + <IMG_CONTEXT> x (num_image_token * tiles) + </img>."""
    n = prompt.count("<image>")
    if n != len(num_patches_list):
        raise NanovlError(f"the prompt has {n} <image> placeholder(s) but {len(num_patches_list)} image(s) were given")
    for tiles in num_patches_list:
        prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (num_image_token * tiles) + "</img>", 1)
    return prompt


def detokenize(tokenizer, tokens):
    """Token ids -> text pieces, never splitting a UTF-8 character across pieces."""
    ids, emitted = [], ""
    for t in tokens:
        ids.append(t)
        text = tokenizer.decode(ids)
        # a trailing U+FFFD is an unfinished character: wait for its next bytes; never yield an empty piece
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            yield text[len(emitted):]
            emitted = text
    if len(text := tokenizer.decode(ids)) > len(emitted):
        yield text[len(emitted):]


def _encode(model, prompt: str, max_new_tokens: int):
    if model.tokenizer is None:
        raise NanovlError("this checkpoint has no tokenizer files (tokenizer.json, vocab.json + merges.txt or tokenizer.model)")
    ids = model.tokenizer.encode(prompt)
    context = model.config.llm_config.max_position_embeddings
    if len(ids) >= context:
        n_img = prompt.count("<IMG_CONTEXT>")
        raise NanovlError(f"the prompt is {len(ids)} tokens ({n_img} of them image tokens) but the model's context is "
                          f"{context}: use fewer tiles or images, or a shorter prompt")
    return ids, min(max_new_tokens, context - len(ids))


def _system(model, template, system_message):
    return system_message or model.config.system_message or template.default_system


def _check_tiles(num_patches_list, pixel_values):
    tiles = 0 if pixel_values is None else pixel_values.shape[0]
    if sum(num_patches_list) != tiles:
        raise NanovlError(f"num_patches_list {list(num_patches_list)} does not add up to the {tiles} tiles in pixel_values")


def _with_placeholder(question: str, pixel_values, history) -> str:
    """The reference prepends '<image>\\n' on the first turn when the question has no placeholder."""
    if pixel_values is not None and history is None and "<image>" not in question:
        return "<image>\n" + question
    return question


@torch.inference_mode()
def stream(model, question: str, pixel_values=None, history=None, num_patches_list=None, max_new_tokens=1024,
           system_message=None, stats=None, **sampling):
    """Yield the answer as text pieces. Follows the reference chat(): '<image>\\n' is prepended on the first turn
    when the question has no placeholder, and all tiles form one image unless num_patches_list splits them."""
    template = get_template(model.config.template)
    question = _with_placeholder(question, pixel_values, history)
    if num_patches_list is None:
        num_patches_list = [] if pixel_values is None else [pixel_values.shape[0]]
    _check_tiles(num_patches_list, pixel_values)
    prompt = build_prompt(template, _system(model, template, system_message), history or [], question)
    ids, max_new_tokens = _encode(model, expand_images(prompt, num_patches_list, model.config.num_image_token),
                                  max_new_tokens)
    stats = stats if stats is not None else generation.Stats()
    t0 = time.perf_counter()
    vit_embeds = None if pixel_values is None else model.features(pixel_values)
    stats.vision_s = time.perf_counter() - t0
    stop = model.tokenizer.token_to_id(template.sep.strip())
    input_ids = torch.tensor([ids], device=model.device)
    tokens = generation.generate(model, input_ids, None, None, max_new_tokens, stop, vit_embeds=vit_embeds,
                                 stats=stats, **sampling)
    yield from detokenize(model.tokenizer, (int(t) for t in tokens if int(t) != stop))


def chat(model, question: str, pixel_values=None, history=None, return_history=False, num_patches_list=None,
         max_new_tokens=1024, system_message=None, **sampling):
    """One answer (greedy unless temperature > 0); with return_history also the history including this turn."""
    answer = "".join(stream(model, question, pixel_values, history, num_patches_list, max_new_tokens,
                            system_message, **sampling)).strip()
    if return_history:
        return answer, list(history or []) + [(_with_placeholder(question, pixel_values, history), answer)]
    return answer


def batch_chat(model, questions, pixel_values=None, num_patches_list=None, max_new_tokens=1024, system_message=None,
               **sampling):
    """One single-turn answer per question, generated together with left padding.
    num_patches_list[i] tiles of pixel_values belong to questions[i] (in order)."""
    template = get_template(model.config.template)
    if pixel_values is not None and (num_patches_list is None or len(num_patches_list) != len(questions)):
        raise NanovlError("batch_chat with images needs num_patches_list with one entry per question")
    if pixel_values is not None:
        _check_tiles(num_patches_list, pixel_values)
    system, prompts = _system(model, template, system_message), []
    for i, q in enumerate(questions):  # each question gets its own image (num_patches_list[i] tiles)
        prompt = build_prompt(template, system, [], _with_placeholder(q, pixel_values, None))
        images = [] if pixel_values is None else [num_patches_list[i]]
        prompts.append(expand_images(prompt, images, model.config.num_image_token))
    encoded = [_encode(model, p, max_new_tokens) for p in prompts]
    T, max_new_tokens = max(len(ids) for ids, _ in encoded), min(n for _, n in encoded)
    stop = model.tokenizer.token_to_id(template.sep.strip())
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else stop
    input_ids = torch.tensor([[pad] * (T - len(ids)) + ids for ids, _ in encoded])
    attention_mask = torch.tensor([[0] * (T - len(ids)) + [1] * len(ids) for ids, _ in encoded])
    out = model.generate(input_ids.to(model.device), pixel_values, attention_mask.to(model.device), max_new_tokens,
                         stop, **sampling)
    answers = []
    for row in out.tolist():
        row = row[:row.index(stop)] if stop in row else row
        answers.append(model.tokenizer.decode(row).strip())
    return answers
