"""Every fast path matches the default path (tiny random checkpoints, CPU). No timings here: speed is measured by
benchmarks/bench.py.

- the decode GEMV (nanovl.llm.Linear sends a single row through torch.mv) == F.linear;
- the fixed-shape decode step over the whole static cache (LanguageModel.decode_step_static, what compile=True
  compiles) == the default decode, eager and compiled;
- the ViT's inference path (CPU bf16: bias and GELU fused into oneDNN's GEMM, layer scale and residual in one op)
  == its training-mode path (F.linear, F.gelu, x + branch * ls), to bf16 rounding;
- int8 weight-only language model (opt-in, nanovl.quantize): its logit drift against bf16 is bounded and printed.
"""
import pytest
import torch
import torch.nn.functional as F

import fixtures as fx
from nanovl.llm import Linear
from nanovl.quantize import Int8Linear, quantize_int8


@pytest.fixture(scope="module")
def model(make_ckpt):
    def get(llm="qwen2", dtype=torch.float32):
        import nanovl

        path, _, cfg = make_ckpt(llm, "300m", seed=7)
        m = nanovl.load(path, dtype=dtype)
        m.img_context_token_id = fx.IMG_CONTEXT_ID
        return m, cfg

    return get


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_gemv_matches_linear(dtype, bias):
    torch.manual_seed(0)
    lin = Linear(96, 80, bias=bias).to(dtype)
    for shape in [(1, 1, 96), (1, 96), (96,)]:  # one row: torch.mv
        x = torch.randn(shape, dtype=dtype)
        ref = F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lin(x).float(), ref, **tol)
        assert lin(x).shape == ref.shape
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), **tol)  # the GEMM path it replaces
    x = torch.randn(2, 3, 96, dtype=dtype)  # several rows: F.linear itself
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def _decode_logits(lm, ids, n, step, key_mask=None, positions=None):
    """Greedy: prefill, then n steps either with the default forward or decode_step_static (whole cache, masked)."""
    B, T = ids.shape
    positions = torch.arange(T).expand(B, T) if positions is None else positions
    cache = lm.new_cache(B, T + n)
    logits = lm(input_ids=ids, positions=positions, cache=cache, key_mask=key_mask, last_only=True)
    out, pos = [logits], positions[:, -1:] + 1
    for i in range(n):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        if step:
            logits = lm.decode_step_static(tok, pos, cache, T + i, key_mask)
        else:
            logits = lm(input_ids=tok, positions=pos, cache=cache, start=T + i, key_mask=key_mask)
        out.append(logits)
        pos = pos + 1
    return torch.cat(out, 1)


@pytest.mark.parametrize("llm", ["qwen2", "internlm2", "phi3"])
def test_static_step_matches_default_decode(model, llm):
    m, cfg = model(llm)
    lm = m.language_model
    ids = fx.random_ids(1, 9, cfg["llm_config"]["vocab_size"], seed=1)
    with torch.inference_mode():
        torch.testing.assert_close(_decode_logits(lm, ids, 6, step=True), _decode_logits(lm, ids, 6, step=False),
                                   rtol=1e-5, atol=1e-5)
        # left padding: the pads stay masked in the whole-cache step
        ids2 = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:, :6]], 1).expand(2, -1).clone()
        ids2[1] = ids[0]
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[0, :3] = 0
        positions = m.positions(ids2, mask)
        key_mask = torch.ones(2, 9 + 6, dtype=torch.bool)
        key_mask[:, :9] = mask.bool()
        torch.testing.assert_close(_decode_logits(lm, ids2, 6, True, key_mask, positions),
                                   _decode_logits(lm, ids2, 6, False, key_mask, positions), rtol=1e-5, atol=1e-5)


def test_compiled_decode_matches_eager(model):
    """generate(compile=True): torch.compile of the one-token step, fixed-size cache; same greedy tokens."""
    m, cfg = model("qwen2")
    ids, pv = fx.image_prompt(1, cfg, seed=3), fx.random_pixel_values(1, seed=3)
    eager = m.generate(ids, pv, max_new_tokens=10)
    compiled = m.generate(ids, pv, max_new_tokens=10, compile=True)
    assert torch.equal(compiled, eager)
    compiled_fn = m.language_model.compiled_decode
    again = m.generate(ids[:, :-2], pv, max_new_tokens=10, compile=True)
    assert torch.equal(again, m.generate(ids[:, :-2], pv, max_new_tokens=10))
    assert m.language_model.compiled_decode is compiled_fn  # torch.compile ran once, not per call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_inference_path_matches_training_path(model, dtype):
    m, _ = model("qwen2", dtype)
    vit = m.vision_model
    x = torch.randn(2, 3, vit.cfg.image_size, vit.cfg.image_size, dtype=dtype)
    with torch.inference_mode():
        fast = vit(x).float()
    vit.train()  # the other path, with grad enabled: no fused ops (drop path is 0 in this checkpoint)
    try:
        ref = vit(x).detach().float()
    finally:
        vit.eval()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    torch.testing.assert_close(fast, ref, **tol)


def test_int8_linear_is_the_dequantized_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    w = q.weight.float() * q.scale.float()[:, None]  # the dequantized weight
    assert (w - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-6  # round to nearest: half a step at most
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q(x[:1, :1]), F.linear(x[:1, :1], w, lin.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_int8_logit_drift_against_bf16(model, llm, capsys):
    """Logits of the int8 language model against bf16 on an image prompt: the drift is bounded and printed."""
    m, cfg = model(llm, torch.bfloat16)
    ids, pv = fx.image_prompt(2, cfg, seed=5), fx.random_pixel_values(2, seed=5)
    with torch.inference_mode():
        ref = m(ids, pixel_values=pv).float()
        quantize_int8(m.language_model)
        assert all(not isinstance(x, torch.nn.Linear) for x in m.language_model.modules())
        assert isinstance(m.vision_model.encoder.layers[0].mlp.fc1, torch.nn.Linear)  # the ViT is never quantized
        q = m(ids, pixel_values=pv).float()
        tokens = m.generate(ids, pv, max_new_tokens=4)
    drift = (q - ref).abs().max().item() / ref.std().item()
    top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n[int8 vs bf16, tiny {llm}: max |logit diff| = {drift:.3f} logit std, top-1 agreement {top1:.0%}]")
    assert drift < 0.25 and top1 >= 0.8
    assert tokens.shape == (1, 4)
