"""The Captioner on a tiny random LLaVA loaded through from_pretrained(dir), and caption post-processing."""

import numpy as np
import pytest
from PIL import Image

from captioning.captioner import Captioner
from captioning.config import PAPER_PROMPT, CaptionConfig
from captioning.text import T5TokenCounter, clean_caption, degenerate_reason, is_repetition_loop
from storage.ingest.samples import photo_variants


@pytest.fixture(scope="module")
def captioner(tiny_llava, tiny_t5):
    return Captioner(CaptionConfig(dataset="sam", model=tiny_llava, t5_tokenizer=tiny_t5,
                                   generation={"max_new_tokens": 24}))


def test_uses_the_chat_template_and_the_paper_prompt(captioner):
    assert captioner.prompt_text == f"USER: <image>\n{PAPER_PROMPT} ASSISTANT:"
    assert type(captioner.model).__name__ == "LlavaForConditionalGeneration"
    assert captioner.processor.tokenizer.padding_side == "left"
    assert captioner.dtype.is_floating_point and str(captioner.device) == "cpu"


def test_batch_generation_is_deterministic_and_batch_independent(captioner):
    images = [captioner.prep.shrink(im) for im in photo_variants(3, 120)]
    first = captioner.generate(captioner.encode(images))
    again = captioner.generate(captioner.encode(images))
    alone = captioner.generate(captioner.encode(images[1:2]))
    assert [c.text for c in first] == [c.text for c in again]
    assert alone[0].text == first[1].text, "left padding must not change a row's caption"
    assert all(c.n_tokens == 24 and c.finish_reason == "length" for c in first)


def test_sampling_is_seeded(tiny_llava, tiny_t5):
    make = lambda seed: Captioner(CaptionConfig(dataset="sam", model=tiny_llava, t5_tokenizer=tiny_t5,  # noqa: E731
                                                generation={"max_new_tokens": 16, "do_sample": True,
                                                            "temperature": 1.5, "seed": seed}))
    image = [Image.new("RGB", (40, 30), (10, 200, 30))]
    a, b, c = (m.generate(m.encode(image))[0].text for m in (make(1), make(1), make(2)))
    assert a == b and a != c


def test_pad_to_square_keeps_the_whole_frame(captioner):
    wide = Image.new("RGB", (400, 100), (250, 0, 0))
    fixed = captioner.prep.fixed(wide)
    side = captioner.prep.side
    assert fixed.shape == (side, side, 3)
    assert fixed[side // 2, 0].tolist()[0] > 200 and fixed[side // 2, -1].tolist()[0] > 200  # both ends kept
    assert np.abs(fixed[0, side // 2].astype(int) - captioner.prep.pad_color).max() <= 2  # padded above
    cropped = captioner.prep.__class__(side, captioner.prep.pad_color, False, 10**8, 10**9).fixed(wide)
    assert (cropped[..., 0] > 200).all()  # the crop sees only the red middle


def test_ray_form_passes_error_rows_through(captioner):
    side = captioner.prep.side
    batch = {"key": np.array(["a", "b"], dtype=object), "error": np.array(["", "bad bytes"], dtype=object),
             "image": np.zeros((2, side, side, 3), dtype=np.uint8)}
    out = captioner(batch)
    assert out["n_tokens"].tolist() == [24, 0] and out["caption"][1] == "" and out["finish_reason"][0] == "length"
    assert "image" not in out and out["key"].tolist() == ["a", "b"]


def test_clean_caption_strips_echo_and_role():
    assert clean_caption("  ASSISTANT: A cat.  ", "Describe") == "A cat."
    assert clean_caption(f"{PAPER_PROMPT} ASSISTANT: A red sofa.", PAPER_PROMPT) == "A red sofa."


@pytest.mark.parametrize("text,finish,reason", [
    ("", "stop", "empty"), ("   ", "length", "empty"),
    ("A cat on a sofa. " + "the the the the the the", "length", "repetition"),
    ("A cat, " + "a red sofa, " * 5, "stop", "repetition"),
    ("A cat sitting on a red sofa near a window", "length", "truncated"),
    ("A cat sitting on a red sofa near a window.", "stop", None),
])
def test_degenerate_reasons(text, finish, reason):
    assert degenerate_reason(text, finish) == reason


def test_repetition_needs_four_repeats():
    assert not is_repetition_loop("a red sofa, a red sofa, a red sofa")
    assert is_repetition_loop("x" * 10)


def test_t5_counter_counts_eos(tiny_t5):
    counter = T5TokenCounter(tiny_t5)
    short, longer = counter(["a cat", "a cat on a red sofa with a watercolor painting of a mountain lake"])
    assert 2 <= short < longer and counter([]) == []
