"""InternVL3.5 thinking mode against shared/reference/internvl3_5.md section 1: the reasoning system prompt byte for
byte, the exact prompts (and token ids) of think=True and of the suppression pre-fill, the <think> parser (0-2 blocks,
the LAST </think>), the streaming splitter with tags cut across pieces, and the CLI's --think / --no-think.

Expected texts are written out here from the spec, never produced by nanovl; token ids come from the asset's own
tokenizer.derived.json through the `tokenizers` library. The tiny Qwen3 checkpoint uses the InternVL2.5 (Qwen2.5)
tokenizer, the only Qwen one in shared/assets: InternVL3.5's Qwen3 tokenizer has <think> and </think> as single added
tokens, this one spells them in several BPE pieces, which is the harder case for the streaming splitter.
Where a test needs the model to think, generation.generate is replaced by a stub that emits fixed ids.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures as fx
from nanovl import thinking
from nanovl.errors import NanovlError
from nanovl.thinking import Display, Reply, Splitter, split_thinking

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = fx.TOKENIZERS / "InternVL2_5-1B-MPO"
if not TOKENIZER.is_dir():
    pytest.skip(f"shared assets not available: {TOKENIZER}", allow_module_level=True)

# internvl3_5.md 1.1: three paragraphs separated by blank lines (the numbered items are paragraphs), no final newline
R1 = """You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason \
through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the \
answer from the think section with a newline.

Ensure that the thinking process is thorough but remains focused on the query. The final answer should be \
standalone and not reference the thinking section."""
SYS_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
STOP = 151645  # <|im_end|>
DIM, RESET = "\x1b[2m", "\x1b[0m"
THOUGHT = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help?"  # 1.3's format


def internvl2_5(system, user, prefill=""):
    """internvl3_5.md 1.2: <|im_start|>system\\n{R1}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n"""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{prefill}")


@pytest.fixture(scope="module")
def ref():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER / "tokenizer.derived.json"))


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    """A tiny InternVL3.5-shaped checkpoint (Qwen3 decoder, template internvl2_5) with a real tokenizer."""
    import nanovl

    path, _, cfg = make_ckpt("qwen3", "300m", seed=70, tokenizer_dir="InternVL2_5-1B-MPO")
    assert cfg["template"] == "internvl2_5"
    return path, nanovl.load(path, dtype=torch.float32, device="cpu")


@pytest.fixture
def emit(monkeypatch, ref):
    """emit(*texts) -> prompts: each generation (one per call, in order) yields the ids of the next text, then the
    stop id; prompts collects the prompt ids each call was given."""
    from nanovl import generation

    def setup(*texts):
        outputs, prompts = [ref.encode(t).ids + [STOP] for t in texts], []

        def generate(model, input_ids, **kw):
            prompts.append(input_ids[0].tolist())
            for t in outputs[len(prompts) - 1]:
                yield torch.tensor([t])

        monkeypatch.setattr(generation, "generate", generate)
        return prompts
    return setup


# ---------------------------------------------------------------------------------------------
# the prompt text and the prompts it gives

def test_r1_prompt_and_prefill_are_the_reference_texts():
    assert thinking.R1_SYSTEM_PROMPT == R1
    assert thinking.SUPPRESS == "<think>\n</think>\n"  # internvl3_5.md 1.5, #1141


def test_think_true_prompt_ids_and_reply(ckpt, emit, ref):
    """chat(think=True): the R1 prompt replaces the system message; the reply is the answer, the reasoning apart."""
    _, model = ckpt
    prompts = emit(THOUGHT)
    reply = model.chat("Hi there", think=True, max_new_tokens=40)
    assert prompts == [ref.encode(internvl2_5(R1, "Hi there")).ids]
    assert type(reply) is Reply and reply == "Hello! How can I help?"
    assert reply.thinking == "The user greets me. I should greet back."


def test_think_true_stream_with_an_image(ckpt, emit, ref):
    """stream() yields the raw text, tags included; the image expands as usual (4 <IMG_CONTEXT> per 56-pixel tile,
    '<image>\\n' prepended on the first turn)."""
    import nanovl

    _, model = ckpt
    pv = nanovl.load_image(fx.ASSETS / "media" / "internvl_examples" / "image1.jpg", max_num=1, input_size=56)
    prompts = emit(THOUGHT)
    assert "".join(model.stream("Colour?", pv, think=True, max_new_tokens=40)) == THOUGHT
    image = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\n"
    assert prompts == [ref.encode(internvl2_5(R1, image + "Colour?")).ids]


def test_batch_chat_think(ckpt, monkeypatch, ref):
    """batch_chat(think=True): the R1 prompt for every question, one Reply each (model.generate is stubbed here)."""
    _, model = ckpt
    seen = []

    def generate(input_ids, pixel_values, attention_mask, max_new_tokens, stop, **kw):
        seen.append([row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)])
        out = [ref.encode(THOUGHT).ids + [STOP], ref.encode("<think>\nx\n</think>\nY<think>\nz").ids + [STOP]]
        width = max(map(len, out))
        return torch.tensor([o + [STOP] * (width - len(o)) for o in out])

    monkeypatch.setattr(model, "generate", generate)
    replies = model.batch_chat(["Hi", "Yo"], think=True, max_new_tokens=40)
    assert seen == [[ref.encode(internvl2_5(R1, "Hi")).ids, ref.encode(internvl2_5(R1, "Yo")).ids]]
    assert [(r, r.thinking) for r in replies] == [("Hello! How can I help?", "The user greets me. I should greet back."),
                                                  ("Y", "x\n\nz")]
    assert all(type(r) is Reply for r in replies)


def test_think_false_prefills_the_empty_block(ckpt, emit, ref):
    """think=False keeps the system message (the template's, or the caller's) and pre-fills the assistant turn."""
    _, model = ckpt
    prompts = emit("Hello!", "Hi.")
    reply = model.chat("Hi there", think=False, max_new_tokens=8)
    assert type(reply) is Reply and reply == "Hello!" and reply.thinking == ""
    reply = model.chat("Hi there", think=False, system_message="Answer briefly.", max_new_tokens=8)
    assert reply == "Hi."
    assert prompts == [ref.encode(internvl2_5(SYS_2_5, "Hi there", "<think>\n</think>\n")).ids,
                       ref.encode(internvl2_5("Answer briefly.", "Hi there", "<think>\n</think>\n")).ids]


def test_think_none_is_unchanged(ckpt, emit, ref):
    """The default: the template's system message, no pre-fill, a plain str with any think block left in it."""
    _, model = ckpt
    prompts = emit(THOUGHT)
    reply = model.chat("Hi there", max_new_tokens=40)
    assert type(reply) is str and reply == THOUGHT
    assert prompts == [ref.encode(internvl2_5(SYS_2_5, "Hi there")).ids]


def test_history_keeps_the_answers_only(ckpt, emit, ref):
    """Multi-turn thinking: each call passes think=True; the earlier turns carry the answer, not the reasoning (the
    returned Reply is what the History stores, its .thinking still there)."""
    _, model = ckpt
    prompts = emit("<think>\nr1\n</think>\nA1", "<think>\nr2\n</think>\nA2")
    a1, history = model.chat("Q1", think=True, return_history=True, max_new_tokens=40)
    a2, history = model.chat("Q2", history=history, think=True, return_history=True, max_new_tokens=40)
    assert (a1, a1.thinking, a2, a2.thinking) == ("A1", "r1", "A2", "r2")
    assert list(history) == [("Q1", "A1"), ("Q2", "A2")] and history[0][1].thinking == "r1"
    second = (f"<|im_start|>system\n{R1}<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1"
              "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1] == ref.encode(second).ids


def test_bad_think_arguments(ckpt):
    _, model = ckpt
    with pytest.raises(NanovlError, match="think=True or a system message, not both"):
        model.chat("Hi", think=True, system_message="Be brief.")
    with pytest.raises(NanovlError, match="not both"):
        model.batch_chat(["Hi"], think=True, system_message="Be brief.")
    with pytest.raises(TypeError, match="think must be True, False or None"):
        next(model.stream("Hi", think="yes"))


# ---------------------------------------------------------------------------------------------
# the parser: the answer is what follows the LAST </think> (internvl3_5.md 1.3, 1.5)

@pytest.mark.parametrize("text,thought,answer", [
    ("Just an answer.\n", "", "Just an answer."),                                          # no tags
    ("<think>\nStep 1.\nStep 2.\n</think>\nBlue.", "Step 1.\nStep 2.", "Blue."),           # one block
    ("<think>\nA\n</think>\n\n<think>\nB\n</think>\n\nBlue.", "A\n\nB", "Blue."),          # two blocks (#1164)
    ("<think>\nWait, maybe. Wait, maybe", "Wait, maybe. Wait, maybe", ""),                # unterminated (#1218)
    ("<think>\n</think>\nBlue.", "", "Blue."),                                             # empty block
    ("reasoning without an opening tag</think>\nBlue.", "reasoning without an opening tag", "Blue."),
    ("<think>a</think>Blue.<think>b", "a\n\nb", "Blue."),                                  # a block opened after
    ("", "", ""),
])
def test_split_thinking(text, thought, answer):
    assert split_thinking(text) == (thought, answer)
    r = Reply.of(text)
    assert (str(r), r.thinking) == (answer, thought)


# ---------------------------------------------------------------------------------------------
# the streaming splitter: tags cut anywhere across pieces

TEXT = "Sure.<think>\nhmm <thin </thi > <think\n</think>\n\n<think>two</think>\nAnswer < </"
INSIDE = "<think>\nhmm <thin </thi > <think\n</think><think>two</think>"  # 1.3: the blocks, tags included


def run(pieces):
    s = Splitter()
    parts = [p for piece in pieces for p in s.feed(piece)] + s.close()
    assert all(t for _, t in parts)
    return parts


def check(parts):
    assert "".join(t for _, t in parts) == TEXT  # nothing lost, nothing added
    assert "".join(t for inside, t in parts if inside) == INSIDE


def test_splitter_every_cut_and_every_character():
    check(run(TEXT))  # one character at a time
    for i in range(len(TEXT) + 1):
        for j in range(i, len(TEXT) + 1, 3):
            check(run([TEXT[:i], TEXT[i:j], TEXT[j:]]))


def test_splitter_on_real_token_pieces(ckpt, ref):
    """The pieces detokenize() yields for the real ids: this tokenizer splits <think> and </think> in several."""
    from nanovl.chat import detokenize

    _, model = ckpt
    ids = ref.encode(TEXT).ids
    assert "<think>" not in [ref.decode([i]) for i in ids]  # the tags really arrive in pieces here
    check(run(list(detokenize(model.tokenizer, ids))))


def shade(out):
    """An independent reading of a terminal's output: (text, per-character dimmed flags) from the two codes."""
    text, flags, dim, i = "", [], False, 0
    while i < len(out):
        if out.startswith(DIM, i) or out.startswith(RESET, i):
            dim, i = out.startswith(DIM, i), i + len(DIM)
        else:
            text, flags, i = text + out[i], flags + [dim], i + 1
    return text, flags, dim


def expected_flags(text):
    start, end = text.index("<think>"), text.rindex("</think>") + len("</think>")
    return [start <= k < end for k in range(len(text))]


def test_display_dims_the_thinking_only():
    show = Display(dim=True)
    out = "".join(show(p) for p in ["<th", "ink>\nThe user", " greets me. I should greet back.\n</", "thi",
                                    "nk>\n\nHello!", " How can I help?"]) + show.close()
    text, flags, dim_at_end = shade(out)
    assert text == THOUGHT and flags == expected_flags(THOUGHT) and not dim_at_end
    plain = Display(dim=False)
    assert plain("<think>") == "<think>" and plain.close() == ""


# ---------------------------------------------------------------------------------------------
# the command line

def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOVL_WEIGHTS": "/nonexistent-weights"}
    return subprocess.run([sys.executable, "-m", "nanovl.generate", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def greedy(model, ref, prompt, n):
    """The model's own greedy continuation of a hand-written prompt (model.generate, not the chat code)."""
    out = model.generate(torch.tensor([ref.encode(prompt).ids]), max_new_tokens=n, eos_token_id=STOP)[0].tolist()
    return model.tokenizer.decode(out[:out.index(STOP)] if STOP in out else out)


def test_cli_think_subprocess_plain_output(ckpt, ref):
    """A real process (stdout a pipe, not a terminal): --think answers from the R1 prompt, with no escape codes."""
    path, model = ckpt
    r = cli("--model", path, "--prompt", "Why is the sky blue?", "--think", "--max-tokens", 6)
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy(model, ref, internvl2_5(R1, "Why is the sky blue?"), 6) + "\n"
    assert "\x1b" not in r.stdout


def test_cli_no_think_prefills(ckpt, ref, capsys):
    from nanovl.cli import main

    path, model = ckpt
    main(["--model", str(path), "--prompt", "Hi", "--no-think", "--max-tokens", "6"])
    assert capsys.readouterr().out == greedy(model, ref, internvl2_5(SYS_2_5, "Hi", "<think>\n</think>\n"), 6) + "\n"


@pytest.mark.parametrize("tty", [True, False])
@pytest.mark.parametrize("no_stream", [False, True])
def test_cli_dims_on_a_terminal_only(ckpt, emit, monkeypatch, capsys, tty, no_stream):
    from nanovl.cli import main

    path, _ = ckpt
    emit(THOUGHT)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    main(["--model", str(path), "--prompt", "Hi", "--think", "--max-tokens", "40"] + ["--no-stream"] * no_stream)
    out = capsys.readouterr().out
    if not tty:
        assert out == THOUGHT + "\n"  # the model's text as it is: split_thinking() can read it
        return
    text, flags, dim_at_end = shade(out)
    assert text == THOUGHT + "\n" and flags == expected_flags(THOUGHT) + [False] and not dim_at_end


def test_cli_chat_history_has_the_answers_only(ckpt, emit, monkeypatch, capsys, ref):
    from nanovl.cli import main

    path, _ = ckpt
    prompts = emit("<think>\nr1\n</think>\nA1", "<think>\nr2\n</think>\nA2")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Q2\n"))
    main(["--model", str(path), "--prompt", "Q1", "--think", "--chat", "--max-tokens", "40"])
    second = (f"<|im_start|>system\n{R1}<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1"
              "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1] == ref.encode(second).ids
    assert "<think>\nr2\n</think>\nA2" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--think", "--system", "Be brief."], "error: --think uses InternVL3.5's reasoning prompt as the system message"),
    (["--think", "--no-think"], "error: argument --no-think: not allowed with argument --think"),
])
def test_cli_refusals(ckpt, capsys, args, message):
    from nanovl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(ckpt[0]), "--prompt", "Hi", *args])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_help_explains_the_flags(capsys):
    from nanovl.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--think InternVL3.5 thinking mode" in text and "--temperature 0.6 --top-p 0.95" in text
    assert "--no-think suppress thinking" in text
