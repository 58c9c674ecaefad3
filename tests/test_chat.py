"""The chat API against the reference rules of vision-and-chat.md sections 4-6: rendered prompts (templates, system
messages, history, several images, video), token counts, batch_chat = chat, stream = non-stream, UTF-8-safe
streaming, the multi-turn vision-feature cache, and the bad-input errors.

Expected prompt strings are written out literally from the spec, never produced by nanovl. Models are tiny random
checkpoints with the real tokenizers from shared/assets (4 image tokens per 56-pixel tile), fp32 on CPU.
"""
import random
import time
from pathlib import Path

import pytest
import torch

import fixtures as fx
from nanovl.chat import detokenize
from nanovl.template import TEMPLATES, build_prompt, expand_images
from nanovl.errors import NanovlError

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
EXAMPLES = ASSETS / "media" / "internvl_examples"
if not fx.TOKENIZERS.is_dir() or not EXAMPLES.is_dir():
    pytest.skip(f"shared assets not available: {ASSETS}", allow_module_level=True)

S = 56  # the tiny checkpoints' image_size
N_TOK = 4  # image tokens per tile: (56/14)^2 * 0.5^2
SYS_INTERNVL = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
FAMILY = {  # template -> (llm family, tokenizer asset); every template with its real tokenizer
    "internvl2_5": ("qwen2", "InternVL2_5-1B-MPO"),
    "Hermes-2": ("qwen2", "InternVL2-1B"),  # InternVL2-1B: Qwen2-0.5B with the Hermes-2 template
    "internlm2-chat": ("internlm2", "InternVL2-2B"),
    "phi3-chat": ("phi3", "Phi-3-mini-128k-instruct"),
}


@pytest.fixture(scope="module")
def get_model(make_ckpt):
    """get_model(template, **config_overrides) -> model with the template's real tokenizer; own instances."""
    import nanovl

    cache = {}

    def get(template="internvl2_5", **over):
        key = repr((template, sorted(over.items())))
        if key not in cache:
            llm, tok = FAMILY[template]
            if llm == "phi3":  # the fixture's Phi-3 context (128) is too short for the Chinese system message
                over = {"llm_config": {"max_position_embeddings": 4096}, **over}
            path, _, _ = make_ckpt(llm, "300m", seed=50, template=template, tokenizer_dir=tok, **over)
            cache[key] = nanovl.load(path, dtype=torch.float32, device="cpu")
        return cache[key]

    return get


@pytest.fixture
def model(get_model):
    return get_model()


class Spy:
    """Wraps a tokenizer and records every text the chat API encodes: the exact prompt it built."""

    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    def encode(self, text, *a, **kw):
        self.prompts.append(text)
        return self.tok.encode(text, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture
def spy(monkeypatch):
    def wrap(model):
        s = Spy(model.tokenizer)
        monkeypatch.setattr(model, "tokenizer", s)
        return s
    return wrap


def image(name, max_num=12, **kw):
    import nanovl

    return nanovl.load_image(EXAMPLES / name, max_num=max_num, input_size=S, **kw)


def img(tiles):
    """The spec's expansion of one <image>: <img> + <IMG_CONTEXT> x (num_image_token * tiles) + </img>."""
    return "<img>" + "<IMG_CONTEXT>" * (N_TOK * tiles) + "</img>"


def internvl2_5(user, system=SYS_2_5):
    """A single-turn internvl2_5 prompt, written from the spec's rendered example."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------
# templates (section 5.4): the spec's exact rendered prompts for (<image>\nQ1, A1, Q2, generate)

GOLDEN = {
    "Hermes-2": "<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\nA1"
                "<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
    "internlm2-chat": "<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\n"
                      "A1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n",
    "phi3-chat": "<|system|>\n{SYS}<|end|><|user|>\n<image>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|>"
                 "<|assistant|>\n",
    "internvl2_5": "<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n<|im_start|>assistant\n"
                   "A1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n",
}
DEFAULT_SYSTEM = {"Hermes-2": SYS_INTERNVL, "internlm2-chat": SYS_INTERNVL, "phi3-chat": SYS_INTERNVL,
                  "internvl2_5": SYS_2_5}
STOP = {"Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>", "internvl2_5": "<|im_end|>"}


@pytest.mark.parametrize("name", GOLDEN)
def test_template_renders_the_spec_prompt(name):
    t = TEMPLATES[name]
    assert t.default_system == DEFAULT_SYSTEM[name]
    assert build_prompt(t, t.default_system, [("<image>\nQ1", "A1")], "Q2") == GOLDEN[name].format(SYS=DEFAULT_SYSTEM[name])
    assert t.sep.strip() == STOP[name]


@pytest.mark.parametrize("name", GOLDEN)
def test_chat_builds_the_spec_prompt_and_stops_on_the_separator(get_model, spy, name):
    """Through the public API, on each template's real tokenizer: the second turn of a conversation about a 1-tile
    image renders exactly the spec's prompt (the image expanded inside the history), and generation stops at the
    separator's token: made the most likely token at the first step, the answer is empty after one step."""
    from nanovl.generation import Stats

    model = get_model(name)
    pv = fx.random_pixel_values(1, seed=1)
    s = spy(model)
    model.chat("Q2", pv, history=[("<image>\nQ1", "A1")], max_new_tokens=4)
    assert s.prompts[-1] == GOLDEN[name].format(SYS=DEFAULT_SYSTEM[name]).replace("<image>", img(1))

    stop = model.tokenizer.token_to_id(STOP[name])
    assert stop is not None
    first = int(model.generate(torch.tensor([model.tokenizer.encode(s.prompts[-1])]), pv, max_new_tokens=1)[0, 0])
    W = model.language_model.lm_head.weight
    saved = W.data[stop].clone()
    try:
        with torch.no_grad():
            W[stop] = 3 * W[first]  # logit(stop) = 3 * the largest logit (> 0 on these random models)
        stats = Stats()
        answer = "".join(model.stream("Q2", pv, history=[("<image>\nQ1", "A1")], max_new_tokens=4, stats=stats))
    finally:
        with torch.no_grad():
            W[stop] = saved
    assert (answer, stats.new_tokens) == ("", 1)


def test_system_message(model, spy):
    s = spy(model)
    model.chat("Hi", system_message="You are terse.", max_new_tokens=2)
    assert s.prompts[-1] == internvl2_5("Hi", system="You are terse.")
    model.chat("Hi", max_new_tokens=2)  # config.json "system_message": null -> the template default
    assert s.prompts[-1] == internvl2_5("Hi")


# ---------------------------------------------------------------------------------------------
# images (section 5.2): one, several separate, several combined; token counts


def test_single_image_prompt_and_token_counts(model, spy):
    """chat() prepends '<image>\\n' on the first turn; the prompt's ids are the text's ids around
    <img> (1 token), 4 x tiles <IMG_CONTEXT> (1 token each) and </img>."""
    pv = image("image1.jpg", max_num=6)
    tiles = pv.shape[0]
    assert tiles == 7  # 1000x747 under max_num 6: a 3x2 grid + the thumbnail (the tiling rule, section 4.1)
    s = spy(model)
    model.chat("Describe the image.", pv, max_new_tokens=2)
    assert s.prompts[-1] == internvl2_5(img(tiles) + "\nDescribe the image.")
    tok = model.tokenizer.tok
    before, after = internvl2_5("<image>\nDescribe the image.").split("<image>")
    ids = tok.encode(s.prompts[-1])
    expected = tok.encode(before) + [tok.token_to_id("<img>")] + [tok.token_to_id("<IMG_CONTEXT>")] * (N_TOK * tiles) \
        + [tok.token_to_id("</img>")] + tok.encode(after)
    assert ids == expected
    assert ids.count(model.img_context_token_id) == N_TOK * tiles


def test_separate_images_with_per_image_tile_limits(model, spy):
    """Image-1: <image>\\nImage-2: <image>\\n... with num_patches_list; each image tiled under its own max_num."""
    a, b, c = image("image1.jpg", max_num=4), image("image2.jpg", max_num=1), image("image4.jpg", max_num=2)
    tiles = [len(a), len(b), len(c)]
    assert tiles == [5, 1, 3]  # 2x2 + thumbnail, 1x1, 2x1 + thumbnail
    q = "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nWhat differs?"
    s = spy(model)
    model.chat(q, torch.cat([a, b, c]), num_patches_list=tiles, max_new_tokens=2)
    assert s.prompts[-1] == internvl2_5(f"Image-1: {img(tiles[0])}\nImage-2: {img(tiles[1])}\n"
                                        f"Image-3: {img(tiles[2])}\nWhat differs?")
    ids = model.tokenizer.tok.encode(s.prompts[-1])
    assert ids.count(model.img_context_token_id) == N_TOK * sum(tiles)
    assert ids.count(model.tokenizer.token_to_id("<img>")) == 3


def test_combined_images(model, spy):
    """'<image>\\n' + question with all tiles in one list entry (num_patches_list=None): one <img> block."""
    a, b = image("image1.jpg", max_num=2), image("image2.jpg", max_num=2)
    s = spy(model)
    model.chat("Describe the two images.", torch.cat([a, b]), max_new_tokens=2)
    assert s.prompts[-1] == internvl2_5(img(len(a) + len(b)) + "\nDescribe the two images.")


def test_history_reexpands_the_first_image(model, spy):
    """Section 5.3: the stored question keeps the '<image>\\n' added on turn 1; turn 2 adds no placeholder."""
    pv = image("image2.jpg", max_num=2)
    n = len(pv)
    s = spy(model)
    a1, history = model.chat("Q1", pv, return_history=True, max_new_tokens=3)
    assert history == [("<image>\nQ1", a1)]
    a2, history = model.chat("Q2", pv, history=history, return_history=True, max_new_tokens=3)
    assert history == [("<image>\nQ1", a1), ("Q2", a2)]
    assert s.prompts[-1] == (f"<|im_start|>system\n{SYS_2_5}<|im_end|>\n<|im_start|>user\n{img(n)}\nQ1<|im_end|>\n"
                             f"<|im_start|>assistant\n{a1}<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                             "<|im_start|>assistant\n")


def test_text_only_chat(model, spy):
    s = spy(model)
    a1, h = model.chat("Hello", return_history=True, max_new_tokens=2)
    model.chat("And?", history=h, max_new_tokens=2)
    assert s.prompts[0] == internvl2_5("Hello") and "<img>" not in s.prompts[-1] and "<image>" not in s.prompts[-1]


# ---------------------------------------------------------------------------------------------
# video (section 4.4 / 5.2)


def test_video_prompt(model, spy):
    import nanovl

    video = EXAMPLES / "red-panda.mp4"
    pv, patches = nanovl.load_video(video, num_segments=4, input_size=S)
    assert patches == [1, 1, 1, 1] and pv.shape == (4, 3, S, S)
    q = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(patches))) + "What is the red panda doing?"
    assert q.startswith("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\nWhat")
    s = spy(model)
    model.chat(q, pv, num_patches_list=patches, max_new_tokens=2)
    assert s.prompts[-1] == internvl2_5("".join(f"Frame{i}: {img(1)}\n" for i in (1, 2, 3, 4))
                                        + "What is the red panda doing?")


# ---------------------------------------------------------------------------------------------
# batch_chat = chat, one by one (section 6)


def test_batch_chat_equals_chat(model, spy):
    ims = [image("image1.jpg", max_num=6), image("image2.jpg", max_num=1), image("image4.jpg", max_num=2)]
    patches = [len(i) for i in ims]
    assert patches == [7, 1, 3]  # different lengths: the batch really is left-padded
    questions = ["Describe the image.", "What is in the picture? Answer briefly.", "<image>\nWhere is this?"]
    s = spy(model)
    batch = model.batch_chat(questions, torch.cat(ims), num_patches_list=patches, max_new_tokens=6)
    assert s.prompts == [internvl2_5(img(n) + "\n" + q.removeprefix("<image>\n")) for q, n in zip(questions, patches)]
    singles = [model.chat(q, i, max_new_tokens=6) for q, i in zip(questions, ims)]
    assert batch == singles and all(singles)


def test_batch_chat_text_only_equals_chat(model):
    questions = ["Hi", "Tell me a long story about a red panda.", "2+2?"]
    batch = model.batch_chat(questions, max_new_tokens=5)
    assert batch == [model.chat(q, max_new_tokens=5) for q in questions]


# ---------------------------------------------------------------------------------------------
# streaming


def test_stream_equals_non_streaming_decode(model, spy):
    """The streamed pieces join to the decode of the tokens generate() gives for the same prompt (stop dropped)."""
    pv = image("image5.jpg", max_num=3)
    s = spy(model)
    pieces = list(model.stream("Describe the image in detail.", pv, max_new_tokens=24))
    ids = torch.tensor([model.tokenizer.encode(s.prompts[-1])])
    stop = model.tokenizer.token_to_id("<|im_end|>")
    tokens = [t for t in model.generate(ids, pv, max_new_tokens=24, eos_token_id=stop)[0].tolist() if t != stop]
    assert len(pieces) > 1 and "".join(pieces) == model.tokenizer.decode(tokens)
    assert model.chat("Describe the image in detail.", pv, max_new_tokens=24) == "".join(pieces).strip()


TEXT = "你好，世界！😀🐼 naïve café 中文测试 🦀 ok ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ẞ"


@pytest.mark.parametrize("tok_name", ["InternVL2_5-1B-MPO", "InternVL2-2B", "Phi-3-mini-128k-instruct"])
def test_detokenize_never_splits_a_character(tmp_path, tok_name):
    """CJK and emoji whose UTF-8 bytes are split across tokens (byte-level BPE and sentencepiece byte fallback):
    no piece holds a U+FFFD or half a character, and the pieces join to the full decode."""
    from nanovl.tokenizer import Tokenizer

    fx.copy_tokenizer(fx.TOKENIZERS / tok_name, tmp_path)
    tok = Tokenizer(tmp_path)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "no token splits a character: the test proves nothing"
    pieces = list(detokenize(tok, ids))
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert all(pieces) and not any("\ufffd" in p for p in pieces) and len(pieces) > 10
    # random token streams (bytes that may never complete included): the pieces still join to the full decode
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(30)]
        assert "".join(detokenize(tok, ids)) == tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# multi-turn vision-feature cache


def test_vision_features_computed_once_per_conversation(model, monkeypatch):
    """3 turns about one 13-tile image: one extract_feature call instead of the reference's 3 (it re-encodes the
    image every turn), the same answers, and the same logits as recomputed features. The features live in the
    conversation's History, not on the model."""
    from nanovl.chat import History
    from nanovl.generation import Stats

    pv = image("image1.jpg", max_num=12)
    calls, seconds = [], []
    extract = model.extract_feature

    def counted(x):
        t0 = time.perf_counter()
        out = extract(x)
        calls.append(len(x))
        seconds.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(model, "extract_feature", counted)

    def conversation(reencode):
        history, answers, vision = None, [], []
        for q in ("Describe the image.", "What colour is it?", "Anything else?"):
            stats = Stats()
            a, history = model.chat(q, pv, history, return_history=True, max_new_tokens=4, stats=stats)
            if reencode:  # the reference's history: a plain list of (question, answer), the image encoded again
                history = list(history)
            answers.append(a)
            vision.append(stats.vision_s)
        return answers, history, vision

    cached, history, v_cached = conversation(reencode=False)
    assert calls == [len(pv)] and isinstance(history, History)
    assert v_cached[0] >= seconds[0] and v_cached[1:] == [0.0, 0.0]  # only the first turn ran the ViT (--verbose)
    calls.clear()
    again, _, _ = conversation(reencode=True)
    assert calls == [len(pv)] * 3 and again == cached

    prompt = build_prompt(TEMPLATES["internvl2_5"], SYS_2_5, history[:2], history[2][0])
    ids = torch.tensor([model.tokenizer.encode(expand_images(prompt, [len(pv)], N_TOK))])
    with torch.no_grad():
        fx.check_close(model(ids, vit_embeds=history.features(model, pv)), model(ids, pixel_values=pv),
                       "turn-3 logits: cached vision features vs recomputed", exact=True)

    calls.clear()
    conv = History()
    conv.features(model, pv)
    conv.features(model, pv)  # remembered
    pv.mul_(0.5)  # edited in place: the remembered features are stale
    conv.features(model, pv)
    conv.features(model, pv.clone())  # another tensor
    assert calls == [len(pv)] * 3
    assert not any(isinstance(v, torch.Tensor) for v in vars(model).values())  # no tensor state on the module


def test_no_stale_features_after_a_weight_update(model):
    """The model keeps no feature cache: after a weight update the same pixel_values give new features (a new
    conversation encodes afresh)."""
    from nanovl.chat import History

    pv = fx.random_pixel_values(1, size=model.config.image_size)
    with torch.no_grad():
        before = History().features(model, pv)
        model.mlp1[3].bias += 1.0
        try:
            after = History().features(model, pv)
        finally:
            model.mlp1[3].bias -= 1.0
    assert torch.allclose(after, before + 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input (section 7 of the issue)


def test_placeholder_image_count_mismatch(model):
    one, two = fx.random_pixel_values(1), fx.random_pixel_values(2)
    with pytest.raises(NanovlError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        model.chat("Image-1: <image>\nImage-2: <image>\nCompare.", one)
    with pytest.raises(NanovlError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        model.chat("<image>\nCompare.", two, num_patches_list=[1, 1])
    with pytest.raises(NanovlError, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        model.chat("<image>\nWhat is this?")
    with pytest.raises(NanovlError, match=r"num_patches_list \[1, 2\] does not add up to the 2 tiles"):
        model.chat("Image-1: <image>\nImage-2: <image>\nCompare.", two, num_patches_list=[1, 2])
    with pytest.raises(NanovlError, match="one entry per question"):
        model.batch_chat(["a", "b"], two, num_patches_list=[2])
    with pytest.raises(NanovlError, match=r"num_patches_list \[2, 1\] does not add up to the 2 tiles"):
        model.batch_chat(["a", "b"], two, num_patches_list=[2, 1])
    with pytest.raises(NanovlError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        model.batch_chat(["<image> and <image>", "b"], two, num_patches_list=[1, 1])


def test_prompt_longer_than_the_context(get_model, monkeypatch):
    """A 96-token context: a long question, or an image tiled into too many tokens, is refused with the numbers,
    before the vision encoder runs; a prompt that fits has its answer cut at the context."""
    from nanovl.generation import Stats

    small = get_model("internvl2_5", llm_config={"max_position_embeddings": 96})
    calls = []
    monkeypatch.setattr(small, "extract_feature", lambda x: calls.append(len(x)))
    with pytest.raises(NanovlError, match=r"the prompt is \d+ tokens \(0 of them image tokens\) but the model's context is 96"):
        small.chat("word " * 100)
    pv = image("image1.jpg", max_num=12)  # 13 tiles -> 52 image tokens on top of the ~50-token system prompt
    with pytest.raises(NanovlError, match=r"\(52 of them image tokens\) but the model's context is 96: use fewer tiles"):
        small.chat("Describe.", pv)
    with pytest.raises(NanovlError, match="context is 96"):
        small.batch_chat(["Describe.", "Hi"], torch.cat([pv, pv[:1]]), num_patches_list=[len(pv), 1])
    assert calls == []
    monkeypatch.undo()
    stats = Stats()
    "".join(small.stream("Hi", max_new_tokens=1000, stats=stats))
    assert stats.prompt_tokens + stats.new_tokens <= 96 and stats.new_tokens > 1
