"""The refill engine (`captioning.engine`, `engine=refill`): byte-identical greedy captions to generate(), finished
rows' slots refilled (counted in forward calls, not timed), exactly-once shards, and key caption tests rerun on it."""

from __future__ import annotations

import json
import shutil
from dataclasses import astuple
from typing import Literal

import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioning.audit import audit_caption_set
from captioning.captioner import Caption, Captioner, ModelLoadError
from captioning.config import CaptionConfig
from captioning.engine import EngineStats
from captioning.records import ensure_caption_set
from captioning.runner import caption_shard
from captioning.text import T5TokenCounter
from storage.configio import load_config
from storage.errors import ConfigError
from storage.ingest.samples import photo_variants
from storage.layout import caption_set_dir
from storage.manifest import committed_manifests
from tests import test_caption_shards as shard_tests
from tests import test_captioner as captioner_tests
from tests.test_caption_shards import sam_root  # noqa: F401 - fixture, for the shard tests below
from tests.test_captioner import captioner  # noqa: F401 - fixture, for the captioner tests below

MAX_NEW = 16
SKEWED = [3, 15, 1, 7, 40, 0, 12, 5, 9, 2]  # 40: past max_new_tokens ("length"); 0: an empty caption ("stop")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return photo_variants(9, 120) + [Image.new("RGB", (40, 30), (10, 200, 30))]


@pytest.fixture(scope="module")
def make(tiny_llava, tiny_t5):
    """Captioners by (engine, attention implementation, config fields), loaded once per module."""
    loaded: dict[tuple, Captioner] = {}

    def make(engine: str, attn: str = "sdpa", **fields) -> Captioner:
        key = (engine, attn, tuple(sorted(fields.items())))
        if key not in loaded:
            cap = Captioner(CaptionConfig(dataset="sam", model=tiny_llava, t5_tokenizer=tiny_t5, engine=engine,
                                          generation={"max_new_tokens": MAX_NEW}, **fields))
            cap.model.set_attn_implementation(attn)
            assert cap.model.config.text_config._attn_implementation == attn
            loaded[key] = cap
        return loaded[key]

    return make


def as_bytes(captions: list[Caption]) -> list[tuple[bytes, int, str]]:
    return [(c.text.encode(), c.n_tokens, c.finish_reason) for c in captions]


def counting_forwards(cap: Captioner, fn):
    """(fn(), number of top-level model forward calls it made)."""
    calls: list[int] = []
    hook = cap.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        return fn(), len(calls)
    finally:
        hook.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("stops", [None, SKEWED], ids=["max-length", "skewed-stops"])
def test_refill_captions_are_byte_identical_to_generate(make, images, attn, stops):
    ref, fast = make("generate", attn), make("refill", attn, batch_size=3)  # 3 slots for 10 images: refills
    prepared = [ref.prep.shrink(im) for im in images]
    want = ref.generate(ref.encode(prepared), stops)  # one generate() call over all 10 rows: the reference
    fast.engine.stats = EngineStats()
    got = fast.generate(fast.encode(prepared), stops)
    assert as_bytes(got) == as_bytes(want)
    stats = fast.engine.stats
    assert stats.rows_prefilled == 10 and stats.max_active == 3 and stats.prefills >= 4
    if stops is None:
        assert all(c.n_tokens == MAX_NEW and c.finish_reason == "length" for c in want)
    else:
        assert [(c.n_tokens, c.finish_reason) for c in want] == [
            (min(s, MAX_NEW), "stop" if s < MAX_NEW else "length") for s in stops]
        assert stats.refills > 0, "rows that finished early must hand their slot to the next image"


def test_finished_rows_free_their_slot_for_the_next_image(make, images):
    """3 rows at a time, one long row in every 3: generate() runs each batch as long as its long row, the refill
    engine runs the three long rows side by side and streams the short ones through the other slots."""
    lengths = [1, 15, 1, 1, 15, 1, 1, 15, 1]
    ref, fast = make("generate"), make("refill", batch_size=3)
    prepared = [ref.prep.shrink(im) for im in images[:9]]
    want, generate_forwards = counting_forwards(ref, lambda: [
        c for i in range(0, 9, 3) for c in ref.generate(ref.encode(prepared[i:i + 3]), lengths[i:i + 3])])
    fast.engine.stats = EngineStats()
    got, refill_forwards = counting_forwards(fast, lambda: fast.generate(fast.encode(prepared), lengths))
    assert as_bytes(got) == as_bytes(want)
    assert [c.n_tokens for c in got] == lengths
    stats = fast.engine.stats
    assert refill_forwards == stats.prefills + stats.decode_steps
    assert generate_forwards == 3 * (1 + 15)  # per batch: prefill + 15 steps (the long row's 15 tokens + its end)
    assert stats.max_active == 3 and stats.rows_prefilled == 9 and stats.refills >= 3
    generate_steps = generate_forwards - 3  # 15 per batch of 3, 14 of them carrying two finished rows
    assert stats.decode_steps <= 15 + 6, astuple(stats)  # the long rows overlap; short rows fill in around them
    assert 2 * stats.decode_steps < generate_steps and refill_forwards < generate_forwards


@pytest.mark.parametrize("generation", ["do_sample=true", "num_beams=2", "repetition_penalty=1.2"])
def test_refill_is_greedy_only(generation):
    with pytest.raises(ConfigError, match="greedy-only"):
        load_config(CaptionConfig, "sam", ["engine=refill", f"generation.{generation}"], kind="caption")
    assert load_config(CaptionConfig, "sam", [f"generation.{generation}"], kind="caption").engine == "generate"


def test_refill_refuses_a_checkpoint_whose_generation_config_changes_logits(tmp_path, tiny_llava, tiny_t5):
    """A checkpoint's generation_config.json can make generate() suppress tokens; the refill engine would not."""
    model = shutil.copytree(tiny_llava, tmp_path / "model")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "suppress_tokens": [5]}))
    cfg = CaptionConfig(dataset="sam", model=str(model), t5_tokenizer=tiny_t5, engine="refill")
    with pytest.raises(ModelLoadError, match="generation_config sets suppress_tokens; use engine=generate"):
        Captioner(cfg)
    assert Captioner(cfg.model_copy(update={"engine": "generate"})).engine is None


def test_engine_does_not_change_the_caption_set(tiny_llava, tiny_t5):
    base = dict(dataset="sam", model=tiny_llava, t5_tokenizer=tiny_t5)
    assert (CaptionConfig(**base).resolved_caption_set()
            == CaptionConfig(**base, engine="refill", refill_rows=4).resolved_caption_set())


def skewed(generate):
    """generate(inputs) with row i of every batch stopped after 1 + 5i mod 11 new tokens (under max_new_tokens)."""
    return lambda inputs: generate(inputs, [1 + 5 * i % 11 for i in range(len(inputs["input_ids"]))])


def test_refill_captions_real_shards_exactly_once_like_generate(sam_root, tiny_llava, tiny_t5):  # noqa: F811
    """Both engines through the runner (`caption_shard`) over two ingested shards (a corrupt image, an error row),
    with skewed caption lengths so slots are refilled inside the runner's batches of 4."""
    counter, rows = T5TokenCounter(tiny_t5), {}
    for engine in ("generate", "refill"):
        cfg = shard_tests.config(sam_root, tiny_llava, tiny_t5, caption_set=engine, engine=engine, batch_size=4,
                                 refill_rows=2)
        ensure_caption_set(cfg)
        cap = Captioner(cfg)
        cap.generate = skewed(cap.generate)
        results = [caption_shard(m, cfg, cap, counter) for m in committed_manifests(sam_root, "sam")]
        assert [(r.num_ok, r.num_error) for r in results] == [(4, 0), (2, 2)]
        report = audit_caption_set(sam_root, "sam", engine)
        assert report["ok"] and report["keys"] == report["rows"] == 8
        d = caption_set_dir(sam_root, "sam", engine)
        rows[engine] = {r["key"]: r for s in ("sa_000000", "sa_000001")
                        for r in pq.read_table(f"{d}/{s}.parquet").to_pylist()}
        assert all(caption_shard(m, cfg, cap, counter).skipped for m in committed_manifests(sam_root, "sam"))
    assert cap.engine is not None and cap.engine.stats.refills > 0 and cap.engine.stats.max_active == 2
    fields = ("status", "error", "caption", "n_tokens", "finish_reason", "degenerate", "t5_tokens")
    assert {k: [r[f] for f in fields] for k, r in rows["refill"].items()} == \
           {k: [r[f] for f in fields] for k, r in rows["generate"].items()}
    assert {r["finish_reason"] for r in rows["refill"].values() if r["status"] == "ok"} == {"stop"}


# -- the caption tests written for the default engine, rerun with engine=refill -------------------------------------


class RefillByDefault(CaptionConfig):
    """A CaptionConfig whose engine is refill unless told otherwise."""

    engine: Literal["generate", "refill"] = "refill"


@pytest.fixture(scope="module", autouse=True)
def _refill_in_reused_tests():
    """The reused tests build their configs from their own module's `CaptionConfig`: point it at RefillByDefault
    while this module runs (autouse + module scope: before their module-scoped `captioner` fixture is built)."""
    with pytest.MonkeyPatch.context() as mp:
        for module in (shard_tests, captioner_tests):
            mp.setattr(module, "CaptionConfig", RefillByDefault)
        yield


def test_reused_tests_run_on_refill(captioner, sam_root, tiny_llava, tiny_t5):  # noqa: F811
    assert captioner.engine is not None
    assert shard_tests.config(sam_root, tiny_llava, tiny_t5).engine == "refill"


test_refill_deterministic_batches = captioner_tests.test_batch_generation_is_deterministic_and_batch_independent
test_refill_ray_form_passes_error_rows_through = captioner_tests.test_ray_form_passes_error_rows_through
test_refill_every_key_gets_one_row = shard_tests.test_every_key_gets_one_row_and_bad_images_lose_nothing
test_refill_crash_mid_shard_then_rerun_is_exactly_once = shard_tests.test_crash_mid_shard_then_rerun_is_exactly_once
test_refill_journeydb_training_text = shard_tests.test_journeydb_keeps_prompt_and_caption_and_chooses_training_text
test_refill_runner_decodes_the_next_shard_ahead = shard_tests.test_runner_decodes_the_next_shard_ahead
