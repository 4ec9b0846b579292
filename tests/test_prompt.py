"""Prompts as ComfyUI and A1111 read them: parsers, chunks, weights, and the embeddings the sampler gets."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from pipeline.errors import SpecError
from pipeline.geometry.scaffold import make_scaffold, pool_noise
from pipeline.sampling.conditioning import PromptEmbeds, repeat_tokens
from pipeline.sampling.sampler import generate
from pipeline.sampling.schedule import make_scheduler
from pipeline.spec import RenderSpec
from pipeline.text.prompt import WINDOW, Parsed, chunk_prompt, parse_prompt
from pipeline.text.text_encode import a1111_emphasis, clip_specials, encode_sdxl_prompt

# (prompt, runs) per ComfyUI's comfy/sd1_clip.py token_weights: (x) x1.1 per level, (x:w) sets w
COMFY = [
    ("a red fox", [("a red fox", 1.0)]),
    ("a (red) fox", [("a ", 1.0), ("red", 1.1), (" fox", 1.0)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("(((x)))", [("x", 1.1**3)]),
    ("((x:1.3))", [("x", 1.3)]),  # sets, not multiplies
    ("(x:0.5) y", [("x", 0.5), (" y", 1.0)]),
    ("a (b (c:1.5) d) e", [("a ", 1.0), ("b ", 1.1), ("c", 1.5), (" d", 1.1), (" e", 1.0)]),
    ("(x: 1.25 )", [("x", 1.25)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number: text at x1.1, as ComfyUI
    ("\\(literal\\) (w)", [("(literal) ", 1.0), ("w", 1.1)]),
    ("[x] y", [("[x] y", 1.0)]),  # no de-emphasis in ComfyUI: brackets are text
    ("a BREAK b", [("a BREAK b", 1.0)]),  # no BREAK either
    ("(a)(b)", [("ab", 1.1)]),
    ("", []),
]

# (prompt, sections) per A1111's modules/prompt_parser.py parse_prompt_attention (its doctests first)
A1111 = [
    ("normal text", [[("normal text", 1.0)]]),
    ("an (important) word", [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]),
    ("(unbalanced", [[("unbalanced", 1.1)]]),
    ("\\(literal\\]", [[("(literal]", 1.0)]]),
    ("(unnecessary)(parens)", [[("unnecessaryparens", 1.1)]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ]
        ],
    ),
    ("[x]", [[("x", 1 / 1.1)]]),
    ("[[x]]", [[("x", 1 / 1.21)]]),
    ("((x:1.3))", [[("x", 1.43)]]),  # multiplies, unlike ComfyUI
    ("(x:0.5) [y", [[("x", 0.5), (" ", 1.0), ("y", 1 / 1.1)]]),  # an unclosed [ reaches the end
    ("a) b", [[("a) b", 1.0)]]),  # a stray ) is text
    ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
    ("BREAK a", [[], [("a", 1.0)]]),  # A1111 closes an empty first chunk too
    ("(a BREAK b)", [[("a", 1.1)], [("b", 1.1)]]),
    ("BREAKFAST", [[("BREAKFAST", 1.0)]]),
    ("\\\\ back", [[("\\ back", 1.0)]]),
    ("a: b", [[("a: b", 1.0)]]),
    ("", [[]]),
]


def _same(parsed: Parsed, sections) -> None:
    assert len(parsed.sections) == len(sections)
    for got, want in zip(parsed.sections, sections, strict=True):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-9)


@pytest.mark.parametrize("text,runs", COMFY, ids=[c[0] or "empty" for c in COMFY])
def test_comfyui_parser(text, runs):
    _same(parse_prompt(text, "comfyui"), [runs])


@pytest.mark.parametrize("text,sections", A1111, ids=[c[0] or "empty" for c in A1111])
def test_a1111_parser(text, sections):
    _same(parse_prompt(text, "a1111"), sections)


@pytest.mark.parametrize(
    "text,style,expect",
    [
        ("a (fox", "comfyui", ["'(' at character 3", "never closed", "\\("]),
        ("a fox) b", "comfyui", ["')' at character 6", "closes no"]),
        ("a [cat:dog:0.5]", "comfyui", ["'[cat:dog:0.5]' at character 3", "prompt editing"]),
        ("a [cat:dog:10]", "a1111", ["prompt editing"]),
        ("a [cat|dog]", "a1111", ["'[cat|dog]'", "alternation"]),
        ("a cat AND a dog", "a1111", ["'AND' at character 7", "composable diffusion"]),
        ("a <lora:x:1> cat", "comfyui", ["'<lora:x:1>'", "--lora"]),
        ("a <lora:x:1> cat", "a1111", ["'<lora:x:1>'", "--lora"]),
        ("a embedding:foo cat", "comfyui", ["embedding:foo", "textual-inversion"]),
        ("(x:1.2.3)", "a1111", ["'1.2.3'", "not a number"]),
        ("(x:inf)", "comfyui", ["weight inf", "finite"]),
        ("a cat", "novelai", ["'novelai'", "comfyui, a1111"]),
    ],
)
def test_refused_syntax_names_what_and_where(text, style, expect):
    with pytest.raises(SpecError) as err:
        parse_prompt(text, style)
    for part in expect:
        assert part in str(err.value)


def test_escaped_brackets_are_text_not_refused():
    assert parse_prompt("\\[a:b:0.5\\]", "a1111").sections == ((("[a:b:0.5]", 1.0),),)
    assert parse_prompt("black and white", "a1111").sections == ((("black and white", 1.0),),)


def test_comfyui_warns_about_a1111_syntax_it_keeps_as_text():
    warnings = parse_prompt("a [cat] BREAK dog", "comfyui").warnings
    assert any("'[cat]'" in w and "a1111" in w for w in warnings)
    assert any("BREAK is plain text" in w for w in warnings)
    assert parse_prompt("a (cat:1.2)", "comfyui").warnings == ()


def test_spec_validates_prompt_style_and_syntax():
    spec = RenderSpec(model="m", prompt="a fox", width=1024, height=1024)
    assert spec.prompt_style == "comfyui" and spec.to_dict()["prompt_style"] == "comfyui"  # recorded in PNGs
    assert RenderSpec.from_dict(spec.to_dict() | {"prompt_style": "a1111"}, "x").validate().prompt_style == "a1111"
    for changes, expect in (
        ({"prompt_style": "webui"}, "prompt_style 'webui': choose one of comfyui, a1111"),
        ({"prompt_style": "a1111", "negative": "ugly AND bad"}, "negative: 'AND'"),
        ({"prompt": "a (fox"}, "prompt: '\\(' at character 3"),
    ):
        with pytest.raises(SpecError, match=expect):
            RenderSpec.from_dict(spec.to_dict() | changes, "x").validate()


# chunking with the tiny byte-level CLIP tokenizer: one token per non-space character


@pytest.fixture(scope="module")
def tok(tiny_model):
    tokenizer = tiny_model.pipe.tokenizer
    return (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]), clip_specials(tokenizer)


def _content(chunk):
    return list(chunk.ids[1 : 1 + chunk.tokens])


@pytest.mark.parametrize("style", ["comfyui", "a1111"])
def test_a_long_prompt_is_chunked_not_cut(tok, style):
    tokenize, specials = tok
    text = "abcdefghij " * 15  # 150 tokens
    chunks = chunk_prompt(parse_prompt(text, style), style, tokenize, specials)
    assert [c.tokens for c in chunks] == [75, 75]
    assert _content(chunks[0]) + _content(chunks[1]) == tokenize(text)
    for c in chunks:
        assert len(c.ids) == len(c.weights) == WINDOW
        assert c.ids[0] == specials.bos and c.ids[1 + c.tokens] == specials.eos


def test_comfyui_keeps_a_short_weighted_run_whole(tok):
    tokenize, specials = tok
    text = "a" * 70 + " (bcdefg:1.2)"  # 70 + 6 tokens: the 6-token run does not fit, so it moves whole
    chunks = chunk_prompt(parse_prompt(text, "comfyui"), "comfyui", tokenize, specials)
    assert [c.tokens for c in chunks] == [70, 6]
    assert chunks[0].ids[71:] == (specials.eos,) + (specials.pad,) * 5
    assert chunks[1].weights[1:7] == pytest.approx([1.2] * 6)
    # a run of 8 or more tokens is split where the window ends
    long = chunk_prompt(parse_prompt("a" * 70 + " (bcdefghij:1.2)", "comfyui"), "comfyui", tokenize, specials)
    assert [c.tokens for c in long] == [75, 4]


def test_a1111_break_and_comma_backtrack(tok):
    tokenize, specials = tok
    chunks = chunk_prompt(parse_prompt("abc BREAK (de)", "a1111"), "a1111", tokenize, specials)
    assert [c.tokens for c in chunks] == [3, 2] and chunks[1].weights[1:3] == pytest.approx([1.1, 1.1])
    # a comma 10 tokens before the chunk fills: the 10 tokens after it open the next chunk
    text = "a" * 64 + ", " + "b" * 20
    chunks = chunk_prompt(parse_prompt(text, "a1111"), "a1111", tokenize, specials)
    assert [c.tokens for c in chunks] == [65, 20]
    assert _content(chunks[1]) == tokenize("b" * 20)
    # no backtrack beyond 20 tokens
    chunks = chunk_prompt(parse_prompt("a" * 50 + ", " + "b" * 40, "a1111"), "a1111", tokenize, specials)
    assert [c.tokens for c in chunks] == [75, 16]


# embeddings from the tiny SDXL's real text encoders


def _long_prompt(tiny_model, tokens: int) -> str:
    text = ", ".join(["a lighthouse on a cliff at dawn"] * 20)
    ids = tiny_model.pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    return tiny_model.pipe.tokenizer.decode(ids[:tokens])


@pytest.mark.parametrize("style", ["comfyui", "a1111"])
def test_150_tokens_give_two_chunks_of_embeddings(tiny_model, style):
    text = _long_prompt(tiny_model, 150)
    cond = tiny_model.encode_prompt(text, "blurry", 3.0, style)
    assert cond.embeds.shape == (1, 154, 64) and cond.negative_embeds.shape == (1, 154, 64)
    assert any("in 2 chunks" in n and style in n for n in cond.notes)
    # the second window carries the text: it is not the empty prompt's encoding
    empty = tiny_model.encode_prompt("", "", 1.0, style).embeds
    assert (cond.embeds[:, 77:] - empty).abs().max() > 1e-3


@pytest.mark.parametrize("style", ["comfyui", "a1111"])
def test_plain_text_equals_the_unweighted_diffusers_encode(tiny_model, style):
    ours = tiny_model.encode_prompt("a red fox in snow", "blurry", 4.0, style)
    embeds, neg, pooled, neg_pooled = tiny_model.pipe.encode_prompt(
        "a red fox in snow", negative_prompt="blurry", do_classifier_free_guidance=True, device="cpu"
    )
    for a, b in ((ours.embeds, embeds), (ours.negative_embeds, neg), (ours.pooled, pooled)):
        assert torch.equal(a, b)
    assert torch.equal(ours.negative_pooled, neg_pooled)


def test_empty_negative_follows_the_style(tiny_model):
    a1111 = tiny_model.encode_prompt("a fox", "", 4.0, "a1111")
    assert a1111.negative_embeds.abs().max() == 0 and a1111.negative_pooled.abs().max() == 0
    comfy = tiny_model.encode_prompt("a fox", "", 4.0, "comfyui")
    empty = tiny_model.encode_prompt("", "", 1.0, "comfyui")
    assert torch.equal(comfy.negative_embeds, empty.embeds) and torch.equal(comfy.negative_pooled, empty.pooled)


def test_comfyui_weight_zero_is_the_empty_prompt_and_a1111_keeps_the_mean(tiny_model):
    pipe = tiny_model.pipe
    zero = encode_sdxl_prompt(pipe, "(abc:0) d", "comfyui", "cpu")[0].embeds
    plain = encode_sdxl_prompt(pipe, "abc d", "comfyui", "cpu")[0].embeds
    empty = encode_sdxl_prompt(pipe, "", "comfyui", "cpu")[0].embeds
    assert torch.allclose(zero[:, 1:4], empty[:, 1:4], atol=1e-6)  # the three weighted tokens
    assert torch.equal(zero[:, 4:], plain[:, 4:])  # weight 1 tokens keep the prompt's encoding
    up = encode_sdxl_prompt(pipe, "(abc:1.5) d", "a1111", "cpu")[0].embeds
    assert torch.allclose(up.mean(), plain.mean(), atol=1e-6)
    assert not torch.allclose(up, plain)
    # the emphasis rule itself: x w, mean restored per window
    z, w = torch.randn(2, 77, 8), torch.ones(2, 77)
    w[0, 3] = 1.4
    out = a1111_emphasis(z, w)
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), atol=1e-6) and torch.equal(out[1], z[1])


def test_pooled_comes_from_the_first_chunk(tiny_model):
    first = tiny_model.encode_prompt("a red fox", "", 1.0, "a1111")
    both = tiny_model.encode_prompt("a red fox BREAK at night in snow", "", 1.0, "a1111")
    assert both.embeds.shape[1] == 154
    # equal up to batching: the two windows run as one encoder batch
    assert torch.allclose(both.pooled, first.pooled, atol=1e-6)
    assert torch.allclose(both.embeds[:, :77], first.embeds, atol=1e-6)


def test_different_lengths_are_repeated_to_a_common_one_without_changing_the_unet(tiny_model):
    cond = tiny_model.encode_prompt(_long_prompt(tiny_model, 100), "blurry", 3.0, "comfyui")
    alone = tiny_model.encode_prompt("blurry", "", 1.0, "comfyui").embeds
    assert torch.equal(cond.negative_embeds, alone.repeat(1, 2, 1))
    unet = tiny_model.denoiser.unet
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    added = {"text_embeds": cond.pooled, "time_ids": torch.tensor([[128, 128, 0, 0, 128, 128]]).float()}
    with torch.no_grad():
        once = unet(x, t, encoder_hidden_states=alone, added_cond_kwargs=added).sample
        twice = unet(x, t, encoder_hidden_states=repeat_tokens(alone, 154), added_cond_kwargs=added).sample
    assert (once - twice).abs().max() < 1e-5
    short = tiny_model.encode_prompt("a", "", 1.0)
    stacked = PromptEmbeds.stack([short, PromptEmbeds(cond.embeds, cond.pooled, None, None)])
    assert stacked.embeds.shape == (2, 154, 64) and torch.equal(stacked.embeds[:1], short.embeds.repeat(1, 2, 1))


@pytest.mark.parametrize("style", ["comfyui", "a1111"])
def test_weighted_chunked_embeds_render_like_diffusers_own_pipeline(tiny_model, style):
    text = _long_prompt(tiny_model, 90) + ", (glowing windows:1.3), [fog]"
    cond = tiny_model.encode_prompt(text, "blurry, (ugly:1.2)", 5.0, style)
    assert cond.embeds.shape[1] == 154
    native = pool_noise(make_scaffold(11, 4, 64, 64), 4)
    ours = generate(tiny_model.denoiser, native, cond, 5.0, 2, "euler")
    pipe = StableDiffusionXLPipeline(**tiny_model.pipe.components)
    pipe.scheduler = make_scheduler("euler", tiny_model.denoiser.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt_embeds=cond.embeds,
        pooled_prompt_embeds=cond.pooled,
        negative_prompt_embeds=cond.negative_embeds,
        negative_pooled_prompt_embeds=cond.negative_pooled,
        latents=native,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=128,
        width=128,
        output_type="latent",
    ).images
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_flux_reads_plain_text_and_says_what_it_ignores_or_cuts(tiny_flux_model):
    weighted = tiny_flux_model.encode_prompt("a (red:1.5) fox", "", 2.0, "comfyui")
    plain = tiny_flux_model.encode_prompt("a red fox", "", 2.0, "comfyui")
    assert torch.equal(weighted.embeds, plain.embeds) and torch.equal(weighted.pooled, plain.pooled)
    assert any("Flux ignores prompt weights" in n for n in weighted.notes)
    assert not any("ignores" in n for n in plain.notes)
    long = tiny_flux_model.encode_prompt("ab " * 300, "", 2.0, "comfyui")
    assert long.embeds.shape[1] == 512
    assert any("901 T5 tokens" in n and "last 389 are cut" in n for n in long.notes), long.notes


def test_the_render_encodes_once_in_the_spec_style_and_logs_the_counts(small_spec, tiny_worker):
    from dataclasses import replace

    from farm.executor import LocalExecutor, prepare
    from pipeline.graph.clock import Clock
    from pipeline.render import start

    spec = replace(small_spec, prompt="a lighthouse BREAK (at dawn:1.2)", negative="", prompt_style="a1111")
    ex, notes, calls = LocalExecutor(tiny_worker), [], []
    inner = ex.call
    ex.call = lambda stage, method, *args: calls.append((method, args)) or inner(stage, method, *args)
    s = start(prepare(spec), ex, Clock(), notes.append)
    assert [c for c in calls if c[0] == "encode_prompt"] == [("encode_prompt", (spec.prompt, "", 3.0, "a1111"))]
    assert s.cond_value.embeds.shape == (1, 154, 64) and s.cond_value.negative_embeds.abs().max() == 0
    assert notes[:2] == [
        "prompt: 17 tokens in 2 chunks (a1111 style)",
        "negative: empty, encoded as zeros (a1111 style)",
    ]
