"""The README's table of supported checkpoints, generated from the catalogue in tests/checkpoints.py.

    python scripts/support_table.py                    # print it
    python scripts/support_table.py --write README.md  # replace the block between the support-table markers

Every row names the tests that back it; tests/test_checkpoints.py checks that those tests exist and that the README
block equals this script's output.
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import checkpoints as ck  # noqa: E402

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
BACKBONE = {"Qwen2ForCausalLM": "Qwen2", "Qwen3ForCausalLM": "Qwen3", "LlamaForCausalLM": "Llama",
            "InternLM2ForCausalLM": "InternLM2", "Phi3ForCausalLM": "Phi-3"}

# label -> the tests behind it ("file::function" or "file::function[param]"); {name}/{hf}/{template} are filled in
# per row
P, F, K = "test_parity.py::", "test_families.py::", "test_checkpoints.py::"
TESTS = {
    "count": [K + "test_parameter_count[{name}]"],
    "bytes": [K + "test_internvl2_1b_safetensors_file_is_the_published_size_to_the_byte"],
    "config": [K + "test_real_config_equals_the_reference_numbers[{name}]"],
    "qwen2": [P + "test_decoder_matches_qwen2", P + "test_whole_model_matches_hf[300m]",
              P + "test_whole_model_generate_matches_hf"],
    "internlm2": [F + "test_internlm2_equals_llama_layout", F + "test_split_wqkv_matches_naive_group_loop",
                  F + "test_whole_model_other_backbones_match_hf[internlm2-300m]"],
    "phi3": [F + "test_phi3_matches_hf_both_factor_sets", F + "test_phi3_generate_across_factor_switch",
             F + "test_whole_model_other_backbones_match_hf[phi3-300m]"],
    "llama": [F + "test_llama_matches_hf", F + "test_whole_model_other_backbones_match_hf[llama-6b]"],
    "qwen3": [F + "test_qwen3_matches_hf", F + "test_whole_model_other_backbones_match_hf[qwen3-300m]"],
    "vit6b": [P + "test_vision_model_matches_hf[6b]", P + "test_whole_model_matches_hf[6b]"],
    "v1": [P + "test_ps_version_v1_is_transposed_v2", K + "test_v1_2_one_tile_is_the_single_resize",
           K + "test_v1_2_logits_match_transformers_with_the_v1_grid", K + "test_v1_2_cli_runs_with_one_tile"],
    "hf": [K + "test_hf_config_reads_into_the_same_model[{hf}]", K + "test_hf_checkpoint_gives_the_original_logits",
           P + "test_hf_format_checkpoint_matches_original"],
    "flash": ["test_flash.py::test_flash_chat_against_reference", "test_flash.py::test_forced_256_is_the_dense_model",
              "test_flash.py::test_flash_checkpoint_saves_and_refuses_hf"],
    "prompt": [K + "test_golden_prompt[{template}]", "test_chat.py::test_template_renders_the_spec_prompt[{template}]"],
}
FAMILY = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2", "Phi3ForCausalLM": "phi3",
          "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
# the checkpoint's own tokenizer (shared/assets/tokenizers): its ids vs an independent reference, and through chat()
T, CHAT = "test_tokenizer.py::", "test_chat.py::test_chat_builds_the_spec_prompt_and_stops_on_the_separator[{}]"
TOKENIZER_TESTS = {
    "InternVL2-1B": [T + "test_qwen_ids[InternVL2-1B-151646]", T + "test_qwen2_merges_quirk",
                     T + "test_qwen_matches_derived_tokenizer_json[InternVL2-1B]", CHAT.format("Hermes-2")],
    "Qwen2.5": [T + "test_qwen_ids[InternVL2_5-1B-MPO-151665]",
                T + "test_qwen_matches_derived_tokenizer_json[InternVL2_5-1B-MPO]", CHAT.format("internvl2_5")],
    "InternLM2": [T + "test_internlm2_ids", T + "test_internlm2_matches_sentencepiece_and_derived",
                  CHAT.format("internlm2-chat")],
    "Phi-3": [T + "test_llama_sentencepiece[phi3-ids0-pinned0-special0]",
              T + "test_phi3_tokenizer_json_equals_tokenizer_model", CHAT.format("phi3-chat")],
    "Yi": [T + "test_llama_sentencepiece[yi-ids2-pinned2-special2]", K + "test_v1_2_cli_runs_with_one_tile"],
}


def tokenizer(c: ck.Checkpoint) -> str | None:
    """Which tokenizer asset matches the checkpoint (InternVL2-1B: Qwen2 vocab 151655; 2.5/3 Qwen: Qwen2.5)."""
    arch, V = c.arch, c.config["llm_config"]["vocab_size"]
    return {("Qwen2ForCausalLM", 151655): "InternVL2-1B", ("Qwen2ForCausalLM", 151674): "Qwen2.5",
            ("InternLM2ForCausalLM", 92553): "InternLM2", ("Phi3ForCausalLM", 32020): "Phi-3",
            ("LlamaForCausalLM", 64007): "Yi"}.get((arch, V))


def labels(c: ck.Checkpoint) -> list[str]:
    out = ["count"] + (["bytes"] if c.name == "InternVL2-1B" else [])
    out += ["config"] if c.name in ck.FROM_REFERENCE else []
    out.append(FAMILY[c.arch])
    if c.vit_size == "6B" and FAMILY[c.arch] != "llama":
        out.append("vit6b")
    if c.config["ps_version"] == "v1":
        out.append("v1")
    if c.hf:
        out.append("hf")
    if c.config.get("flash_mode"):
        out.append("flash")
    out.append("prompt")
    if tokenizer(c):
        out.append("tokenizer")
    return out


def tests_for(c: ck.Checkpoint) -> list[str]:
    """Every test id behind row `c`."""
    fill = dict(name=c.name, hf=c.hf, template=c.config["template"])
    ids = [t.format(**fill) for label in labels(c) if label != "tokenizer" for t in TESTS[label]]
    return ids + (TOKENIZER_TESTS[tokenizer(c)] if tokenizer(c) else [])


def param_count(c: ck.Checkpoint) -> int:
    import torch

    from nanovl.config import InternVLConfig
    from nanovl.model import InternVL

    with torch.device("meta"):
        return sum(p.numel() for p in InternVL(InternVLConfig.from_dict(c.config)).parameters())


def render(counts: dict | None = None) -> str:
    """The Markdown block (without the markers). counts: {name: parameters} if already computed."""
    counts = counts or {c.name: param_count(c) for c in ck.CHECKPOINTS}
    sources = {}
    rows = ["| checkpoint | LM backbone (base) | ViT | template | ps | formats | parameters (nanovl) | published "
            "| verified by |", "|---|---|---|---|---|---|---|---|---|"]
    for c in ck.CHECKPOINTS:
        n, p = counts[c.name], c.published
        mark = "✓" if p.check(n) else "✗"
        ref = sources.setdefault(p.source, len(sources) + 1)
        name = f"{c.name} (also {c.also})" if c.also else c.name
        fmt = f"original, -hf ({c.hf})" if c.hf else "original"
        vit = c.vit.removeprefix("InternViT-")
        lm = f"{BACKBONE[c.arch]} ({c.base})"
        rows.append(f"| {name} | {lm} | {vit} | {c.config['template']} | {c.config['ps_version']} | {fmt} "
                    f"| {n / 1e9:.3f}B | {p.text} {mark} [{ref}] | {', '.join(labels(c))} |")
    legend = ["", "Published sizes: " + "; ".join(f"[{i}] {s}" for s, i in sources.items()) + ".",
              "Where only the name's size class was found offline (`name`), the count is checked to ±20% (names are "
              "size classes: InternVL3-14B has 15.1B parameters) and exactly against the tensors the spec lists "
              "(`count`). Sizes given with 3 decimals, as bytes or with 1 decimal are checked to their rounding.", "",
              "Verified by (tests/, all run in CI on CPU; each row's own parameters fill in `[...]`):", ""]
    for label, tests in TESTS.items():
        legend.append(f"- `{label}`: " + ", ".join(f"`{t}`" for t in tests))
    legend.append("- `tokenizer`: the checkpoint's own tokenizer (shared/assets/tokenizers), its ids against an "
                  "independent reference and through the chat API: "
                  + "; ".join(f"{k}: " + ", ".join(f"`{t}`" for t in tests) for k, tests in TOKENIZER_TESTS.items()))
    real = [f"{c.name}: {c.config_source}" for c in ck.CHECKPOINTS if c.config_source.startswith("assets/")]
    legend += ["", "Configs come from real files where one was found offline (" + "; ".join(real) + "), every other "
               "row from the tables of shared/reference/language-models.md §1 and vision-and-chat.md §1.1, §5.4 "
               "(`config` checks that both agree where both exist)."]
    notes = [f"{c.name}: {c.notes}" for c in ck.CHECKPOINTS if c.notes]
    legend += ["", "Notes: " + "; ".join(notes) + "."]
    refused = ", ".join(f"{n} ({cfg['llm_config']['architectures'][0]})" for n, cfg in ck.UNSUPPORTED.items())
    legend += ["", f"Refused when config.json is read, with an error that names the architecture and lists the "
                   f"supported ones (`test_checkpoints.py::test_unsupported_architecture_is_refused_at_load_time`): "
                   f"{refused}."]
    return "\n".join(rows + legend)


def replace_block(text: str, block: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"no {START} ... {END} block")
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda m: f"{START}\n{block}\n{END}", text, flags=re.S)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="README", help="replace the block between the support-table markers")
    args = ap.parse_args(argv)
    block = render()
    if args.write:
        path = Path(args.write)
        path.write_text(replace_block(path.read_text(), block))
    else:
        print(block)


if __name__ == "__main__":
    main()
