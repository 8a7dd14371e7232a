"""Tiny random models for tests and the offline demo: saved with `save_pretrained`, loaded back through the same
`from_pretrained(dir)` code path that real hub ids use. Their captions are noise: they exercise the pipeline, not
the language. Built on the fly (tokenizer files are not portable across transformers major versions)."""

from __future__ import annotations

from pathlib import Path

LLAVA15_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CORPUS = ["a photo of a cat on a red sofa", "describe this image and its style in a very detailed manner",
          "a watercolor painting of a mountain lake at sunset", "the astronaut stands in a field of flowers"]


def make_tiny_llava(out_dir: str | Path) -> str:
    """LLaVA-1.5-shaped: CLIP vision tower 32 px / patch 8 (16 image tokens), 2-layer Llama, byte-level BPE."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left",
                                  model_input_names=["input_ids", "attention_mask"])
    # The PIL backend by name: `CLIPImageProcessor` needs torchvision (not installable beside the pinned torch) and
    # warns on every build while falling back to this same class. It still saves as type CLIPImageProcessor.
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA15_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    from storage.hub import quiet_progress

    with quiet_progress():  # no "Writing model shards" bar in test and demo logs
        LlavaForConditionalGeneration(cfg).save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return str(out_dir)


def make_tiny_t5_tokenizer(out_dir: str | Path) -> str:
    """A T5-style Unigram tokenizer (pad=0, eos=1, unk=2) trained with `tokenizers` only."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(CORPUS * 10, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                  model_max_length=120, model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(out_dir)
    return str(out_dir)
