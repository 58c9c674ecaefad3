"""InternVL3.5 thinking mode: the reasoning system prompt, the pre-fill that suppresses thinking, and the parsers that
take the <think>...</think> part apart from the answer (whole, or as it streams). chat.py and cli.py call setup/Reply."""
from nanovl.errors import NanovlError

# The reasoning ("R1") system prompt, byte for byte: OpenGVLab/InternVL @19b0da2,
# internvl_chat/tools/reasoning_data_pipeline/utils/constants.py R1_SYSTEM_PROMPT (the same text in
# internvl_chat_gpt_oss/internvl/train/internvl_chat_mpo.py, and as THINKING_SYSTEM_PROMPT in vllm-project/recipes
# InternVL/InternVL3_5.md "Thinking Mode"). The model card switches it on with model.system_message = R1_SYSTEM_PROMPT.
R1_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason "
    "through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the "
    "answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section.")
OPEN, CLOSE = "<think>", "</think>"
# OpenGVLab/InternVL#1141, the maintainer (2025-09-22): the Qwen3 base "is attached to think mode"; pre-fill the
# assistant turn with an empty think block to switch thinking off
SUPPRESS = OPEN + "\n" + CLOSE + "\n"
DIM, RESET = "\x1b[2m", "\x1b[0m"  # ANSI faint, and back to normal


class Reply(str):
    """The answer (a str, as chat() always returned) with the reasoning in .thinking ('' when there was none)."""

    def __new__(cls, answer: str, thinking: str = ""):
        reply = super().__new__(cls, answer)
        reply.thinking = thinking
        return reply

    @classmethod
    def of(cls, text: str) -> "Reply":
        thinking, answer = split_thinking(text)
        return cls(answer, thinking)


def setup(think, system_message):
    """-> (system message, assistant pre-fill) for think=None (unchanged), True (the R1 prompt) or False (the empty
    think block pre-filled). think=True with a system_message is refused: the R1 prompt IS the system message."""
    if think is not None and not isinstance(think, bool):
        raise TypeError(f"think must be True, False or None, got {think!r:.40}")
    if think and system_message is not None:
        raise NanovlError("think=True replaces the system message with InternVL3.5's reasoning prompt: give think=True "
                          "or a system message, not both")
    return (R1_SYSTEM_PROMPT if think else system_message), (SUPPRESS if think is False else "")


def split_thinking(text: str) -> tuple[str, str]:
    """-> (thinking, answer). The answer is the text after the LAST </think> (the reference's parsers: rsplit on it),
    up to an unterminated <think>; everything else, tags removed, is the thinking: 0, 1 or 2 blocks, each stripped,
    joined by a blank line. No tags: ('', text). An unterminated <think> (the token limit): its text is thinking."""
    head, close, answer = text.rpartition(CLOSE)
    answer, open_, rest = answer.partition(OPEN)  # a block opened after the last </think> and never closed
    parts = [head, rest]
    if not close and not open_:
        return "", answer.strip()
    thoughts = [p.strip() for part in parts for q in part.split(OPEN) for p in q.split(CLOSE)]
    return "\n\n".join(p for p in thoughts if p), answer.strip()


class Splitter:
    """Streamed text pieces -> [(inside a think block, text), ...], the tags given with their block. A tag may arrive
    split across pieces: a piece's tail that could begin one waits for the next piece (or close())."""

    def __init__(self):
        self.inside, self.held = False, ""

    def feed(self, piece: str) -> list:
        text, out = self.held + piece, []
        while (i := text.find(tag := CLOSE if self.inside else OPEN)) >= 0:
            cut = i + len(tag) if self.inside else i  # the tag goes with the block
            out.append((self.inside, text[:cut]))
            text, self.inside = text[cut:], not self.inside
            if self.inside:  # the <think> itself
                out.append((True, OPEN))
                text = text[len(OPEN):]
        k = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
        out.append((self.inside, text[:len(text) - k]))
        self.held = text[len(text) - k:]
        return [(inside, t) for inside, t in out if t]

    def close(self) -> list:
        text, self.held = self.held, ""
        return [(self.inside, text)] if text else []


class Display:
    """What the CLI prints for each streamed piece: with dim=True the think blocks between ANSI faint and reset codes
    (each piece on its own, so an interrupt leaves the terminal normal); with dim=False the pieces unchanged."""

    def __init__(self, dim: bool):
        self.splitter = Splitter() if dim else None

    def __call__(self, piece: str) -> str:
        return piece if self.splitter is None else self._render(self.splitter.feed(piece))

    def close(self) -> str:
        return "" if self.splitter is None else self._render(self.splitter.close())

    @staticmethod
    def _render(parts) -> str:
        return "".join(DIM + t + RESET if inside else t for inside, t in parts)
