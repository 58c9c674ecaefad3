"""The conversation API of the reference: chat(), stream() and batch_chat(), bound to InternVL as methods.

chat/stream/batch_chat -> template.build_prompt + expand_images -> tokenizer -> generation.encode_images (the ViT)
-> generation.generate (prefill + decode against a static KV cache) -> detokenize.
"""
import torch

from nanovl import generation, limits, thinking
from nanovl.errors import NanovlError
from nanovl.router import compress_prompt
from nanovl.template import build_prompt, expand_images, get_template


class History(list):
    """A conversation: the reference's [(question, answer), ...] list, which also keeps the image features of its
    pixel_values so that later turns do not run the vision encoder again. The features stay with the conversation
    (never on the model): a new conversation, or new pixel_values, encodes afresh."""

    def __init__(self, turns=(), vision=None):
        super().__init__(turns)
        self.vision = vision  # (pixel_values, (its _version, flash_force), vit_embeds) of the last encoded image(s)

    def features(self, model, pixel_values, stats=None):
        """vit_embeds of pixel_values: remembered from an earlier turn of this conversation, or encoded now."""
        pv, version, vit = self.vision or (None, None, None)
        key = (pixel_values._version, model.flash_force)  # Flash: forcing 256 or 64 tokens changes the features
        if pv is not pixel_values or version != key:
            vit = generation.encode_images(model, pixel_values, stats)
            self.vision = (pixel_values, key, vit)
        return vit


def detokenize(tokenizer, tokens):
    """Token ids -> text pieces, never splitting a UTF-8 character across pieces. It decodes the whole answer again
    at every token (quadratic, but cheap next to the decoder, and exactly what decode() of all ids gives)."""
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
    vocab = model.config.llm_config.vocab_size
    if max(ids, default=0) >= vocab:
        raise NanovlError(f"the tokenizer gives the id {max(ids)}, but the model's vocabulary has {vocab} entries: the "
                          "tokenizer files and config.json's llm_config.vocab_size do not belong together")
    context = model.config.llm_config.max_position_embeddings
    if len(ids) >= context:
        n_img = prompt.count("<IMG_CONTEXT>")
        raise NanovlError(f"the prompt is {len(ids)} tokens ({n_img} of them image tokens) but the model's context is "
                          f"{context}: use fewer tiles or images, or a shorter prompt")
    return ids, min(max_new_tokens, context - len(ids))


def _system(model, template, system_message):
    return system_message or model.config.system_message or template.default_system


def _check_call(model, questions, pixel_values, history, system_message, max_new_tokens, sampling):
    """Everything a chat call is given, checked before any work: types, texts, pixel_values' shape, the options."""
    for q in questions:
        if not isinstance(q, str):
            raise TypeError(f"a question must be a str, got {type(q).__name__}: nanovl's call is model.chat(question, "
                            "pixel_values, ...) (the model carries its tokenizer)")
        limits.text(q, "the question")
    if system_message is not None:
        limits.text(system_message, "system_message")
    if history is not None and not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    for turn in history or []:
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise TypeError(f"history must be a list of (question, answer) pairs, got an item {turn!r:.60}")
        limits.text(turn[0], "a question in history")
        limits.text(turn[1], "an answer in history")
    if pixel_values is not None:
        limits.pixel_values(pixel_values, model.config.image_size, model.config.vision_config.num_channels)
    limits.generation(max_new_tokens, **sampling)


def _prompt(model, template, system_message, history, question, prefill="") -> str:
    """The whole conversation as text, before the images are expanded: checked against limits.MAX_PROMPT_CHARS.
    prefill: the start of the assistant turn (thinking.SUPPRESS for think=False)."""
    prompt = build_prompt(template, _system(model, template, system_message), history, question) + prefill
    limits.within("MAX_PROMPT_CHARS", len(prompt), "the prompt (system message, history and question)",
                  "use a shorter prompt")
    return prompt


def _check_tiles(num_patches_list, pixel_values):
    if not isinstance(num_patches_list, (list, tuple)):
        raise TypeError(f"num_patches_list must be a list of tile counts, got {type(num_patches_list).__name__}")
    for n in num_patches_list:
        limits.whole(n, "each entry of num_patches_list", 1)
    tiles = 0 if pixel_values is None else pixel_values.shape[0]
    if sum(num_patches_list) != tiles:
        raise NanovlError(f"num_patches_list {list(num_patches_list)} does not add up to the {tiles} tiles in pixel_values")


def with_placeholder(question: str, pixel_values, history) -> str:
    """The reference prepends '<image>\\n' on the first turn when the question has no placeholder."""
    if pixel_values is not None and not history and "<image>" not in question:
        return "<image>\n" + question
    return question


@torch.inference_mode()
def stream(model, question: str, pixel_values=None, history=None, num_patches_list=None, max_new_tokens=1024,
           system_message=None, stats=None, think=None, **sampling):
    """Yield the answer as text pieces. Follows the reference chat(): '<image>\\n' is prepended on the first turn
    when the question has no placeholder, and all tiles form one image unless num_patches_list splits them.
    history: earlier turns; a History also keeps (and here reuses or fills) the image features."""
    template = get_template(model.config.template)
    system_message, prefill = thinking.setup(think, system_message)  # think: as chat(); the pieces keep the tags
    _check_call(model, [question], pixel_values, history, system_message, max_new_tokens, sampling)
    question = with_placeholder(question, pixel_values, history)
    tiles_per_image = num_patches_list  # the reference's keyword; tiles, not 14-pixel patches
    if tiles_per_image is None:
        tiles_per_image = [] if pixel_values is None else [pixel_values.shape[0]]
    _check_tiles(tiles_per_image, pixel_values)
    prompt = _prompt(model, template, system_message, history or [], question, prefill)
    ids, max_new_tokens = _encode(model, expand_images(prompt, tiles_per_image, model.config.num_image_token),
                                  max_new_tokens)
    stats = stats if stats is not None else generation.Stats()
    conversation = history if isinstance(history, History) else History()
    vit_embeds = None if pixel_values is None else conversation.features(model, pixel_values, stats)
    if isinstance(vit_embeds, list):  # Flash: a compressed tile keeps 64 of its 256 <IMG_CONTEXT> (router.py)
        stats.compressed = [len(t) < model.config.num_image_token for t in vit_embeds]
        ids = compress_prompt(ids, [len(t) for t in vit_embeds], model.img_context_token_id)
    stop = model.tokenizer.token_to_id(template.sep.strip())
    input_ids = torch.tensor([ids], device=model.device)
    tokens = generation.generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 vit_embeds=vit_embeds, stats=stats, **sampling)
    yield from detokenize(model.tokenizer, (int(t) for t in tokens if int(t) != stop))


def chat(model, question: str, pixel_values=None, history=None, return_history=False, num_patches_list=None,
         max_new_tokens=1024, system_message=None, think=None, **sampling):
    """One answer (greedy unless temperature > 0); with return_history also the History including this turn (it keeps
    the image features). think (InternVL3.5): None as the reference, True the reasoning prompt, False thinking
    suppressed; then the answer is a thinking.Reply: the text after the last </think>, the reasoning in .thinking."""
    if history is not None and not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    conversation = history if isinstance(history, History) else History(history or [])
    answer = "".join(stream(model, question, pixel_values, conversation, num_patches_list, max_new_tokens,
                            system_message, think=think, **sampling)).strip()
    if think is not None:
        answer = thinking.Reply.of(answer)
    if return_history:
        turn = (with_placeholder(question, pixel_values, history), answer)
        return answer, History(list(conversation) + [turn], conversation.vision)
    return answer


def batch_chat(model, questions, pixel_values=None, num_patches_list=None, max_new_tokens=1024, system_message=None,
               think=None, **sampling):
    """One single-turn answer per question, generated together with left padding.
    num_patches_list[i] tiles of pixel_values belong to questions[i] (in order). think: as chat()."""
    template = get_template(model.config.template)
    system_message, prefill = thinking.setup(think, system_message)
    if isinstance(questions, str) or not isinstance(questions, (list, tuple)):
        raise TypeError(f"batch_chat takes a list of questions, got {type(questions).__name__}: use chat() for one "
                        "question, or pass [question]")
    if not questions:
        raise NanovlError("batch_chat got no questions: give a list of at least one")
    _check_call(model, questions, pixel_values, None, system_message, max_new_tokens, sampling)
    if pixel_values is not None and (num_patches_list is None or len(num_patches_list) != len(questions)):
        raise NanovlError("batch_chat with images needs num_patches_list with one entry per question")
    if pixel_values is not None:
        _check_tiles(num_patches_list, pixel_values)
    prompts = []
    for i, q in enumerate(questions):  # each question gets its own image (num_patches_list[i] tiles)
        prompt = _prompt(model, template, system_message, [], with_placeholder(q, pixel_values, None), prefill)
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
    return answers if think is None else [thinking.Reply.of(a) for a in answers]
