"""Captioning stage: caption the ingested images with a LLaVA-family model through transformers.

- `config`: CaptionConfig (model, prompt, generation, executor) and the caption-set name it implies.
- `captioner`: Captioner (load once, `encode` on CPU, `generate` on the accelerator) and ModelLoadError.
- `engine`: the refill (continuous-batching) greedy decoder behind `engine=refill`.
- `sizing`: the largest batch whose KV cache fits in free GPU memory.
- `images`: ImagePrep, decoding, padding to square and shrinking images for the vision tower.
- `text`: cleaning captions, flagging degenerate ones, counting T5 tokens (T5TokenCounter).
- `records`: caption rows, their parquet schema, and the identity of a caption set.
- `shard`: one shard of captions, resumable and committed exactly once (on `storage.shard`).
- `runner`: the local executor, decoding ahead of generation.
- `audit`: `pixart audit`, proving every manifest key has exactly one caption or error row.
- `quality`: the caption-quality report (PixArt-alpha's caption-density table).
- `tiny`: tiny random models for tests and the offline demo.
"""
