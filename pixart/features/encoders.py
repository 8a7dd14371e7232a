"""The two frozen encoders of feature extraction, each loaded once and run in batches.

    text = TextEncoder("DeepFloyd/t5-v1_1-xxl", max_tokens=120)     # T5EncoderModel + its tokenizer
    feats = text.encode(["a cat on a sofa", ...])                    # [n_valid_tokens, 4096] fp16 each, no padding
    vae = LatentEncoder("stabilityai/sd-vae-ft-ema")
    mean, std = vae.encode(images)                                   # uint8 HxWx3, one shape per batch -> fp16

T5 runs with the attention mask and each batch padded only to its longest caption; only the valid tokens (EOS
included) are kept, so a 30-token caption stores 30 rows, not 120. The loader pads back to 120 and rebuilds the
mask. The VAE stores the posterior mean and std, so training samples the posterior as PixArt does.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from pixart.features.format import npy_bytes
from storage.config import DEFAULT_MAX_TOKENS
from storage.devices import resolve_device, resolve_dtype  # noqa: F401 - importable from here too
from storage.hub import from_pretrained


class TextEncoder:
    def __init__(self, model_id: str, max_tokens: int = DEFAULT_MAX_TOKENS, device: str = "auto",
                 dtype: str = "auto") -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_tokens = max_tokens
        self.tokenizer = from_pretrained(AutoTokenizer.from_pretrained, model_id, "T5 tokenizer", "t5_model")
        self.model = from_pretrained(T5EncoderModel.from_pretrained, model_id, "T5 encoder", "t5_model",
                                     dtype=self.dtype)
        self.model.to(self.device).eval()
        self.width = self.model.config.d_model

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """One [n_tokens, d_model] float16 array per text: the valid (unpadded) tokens only."""
        if not texts:
            return []
        batch = self.tokenizer(texts, max_length=self.max_tokens, padding="longest", truncation=True,
                               add_special_tokens=True, return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = hidden.to(torch.float16).cpu().numpy()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [np.ascontiguousarray(hidden[i, :n]) for i, n in enumerate(lengths)]


class LatentEncoder:
    def __init__(self, model_id: str, device: str = "auto", dtype: str = "auto") -> None:
        from diffusers import AutoencoderKL

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = from_pretrained(AutoencoderKL.from_pretrained, model_id, "VAE", "vae_model",
                                     torch_dtype=self.dtype, low_cpu_mem_usage=False)  # False: no accelerate
        self.model.to(self.device).eval()
        self.scaling_factor = float(self.model.config.scaling_factor)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float16 arrays of shape [B, 4, H/8, W/8] for B uint8 HxWx3 images of one shape."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        x = (x.to(self.dtype) / 127.5) - 1.0  # [0, 255] -> [-1, 1], as ToTensor + Normalize(0.5, 0.5)
        posterior = self.model.encode(x).latent_dist
        mean = posterior.mean.to(torch.float16).cpu().numpy()
        std = posterior.std.to(torch.float16).cpu().numpy()
        return mean, std


# ---------------------------------------------------------------------------------------------------------------------
# Batch form: one callable per encoder over a dict of columns, what a Ray Data actor pool maps (flows/_ray_stage.py).
# Arrays travel as .npy bytes (allow_pickle=False), so rows of different buckets share one schema.
# ---------------------------------------------------------------------------------------------------------------------


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class TextBatchEncoder:
    """batch["texts"]: a JSON list of texts per row -> batch["feats"]: their features, concatenated, as .npy bytes,
    and batch["lengths"]: a JSON list of their token counts."""

    def __init__(self, model: str, max_tokens: int, device: str, dtype: str) -> None:
        self.encoder = TextEncoder(model, max_tokens, device, dtype)

    def __call__(self, batch: dict) -> dict:
        feats, lengths = [], []
        for texts in batch["texts"]:
            out = self.encoder.encode(json.loads(texts))
            feats.append(npy_bytes(np.concatenate(out)))
            lengths.append(json.dumps([len(f) for f in out]))
        return {**batch, "feats": np.array(feats, dtype=object), "lengths": np.array(lengths, dtype=object)}


def split_features(row: dict) -> list[np.ndarray]:
    """The per-text feature arrays of one `TextBatchEncoder` output row."""
    flat = _npy(row["feats"])
    cuts = np.cumsum([0, *json.loads(row["lengths"])])
    return [flat[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class LatentBatchEncoder:
    """batch["pixels"]: one bucket group per row as .npy bytes ([B, H, W, 3] uint8; b"" for an error row) ->
    batch["mean"], batch["std"]: .npy bytes of the posterior (b"" for an error row)."""

    def __init__(self, model: str, device: str, dtype: str) -> None:
        self.encoder = LatentEncoder(model, device, dtype)

    def __call__(self, batch: dict) -> dict:
        means, stds = [], []
        for error, pixels in zip(batch["error"], batch["pixels"], strict=True):
            if error:
                means.append(b"")
                stds.append(b"")
                continue
            mean, std = self.encoder.encode(list(_npy(pixels)))
            means.append(npy_bytes(mean))
            stds.append(npy_bytes(std))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        return {**out, "mean": np.array(means, dtype=object), "std": np.array(stds, dtype=object)}


def posterior_of(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of one `LatentBatchEncoder` output row."""
    return _npy(row["mean"]), _npy(row["std"])
