"""The fixed text conditions of a run, encoded once by T5 before training (`pixart.train.prepare.prepare_conditions`:
in the driver's process locally, in a Ray task on a GPU worker with executor=ray) and read by every worker:

- the null caption, T5("") with its mask: captions dropped for classifier-free guidance are replaced by it, and
  it is the negative prompt at sampling (diffusers' PixArtAlphaPipeline uses the same), so guidance matches training;
- the sample prompts' features, for the sample grids.

Stored as `runs/<run>/conditions.safetensors` (fp16, valid tokens, padded to max_tokens with masks).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from storage.commit import write_atomic
from storage.errors import PipelineError, one_line
from storage.layout import run_dir
from storage.urls import exists, join, open_url

if TYPE_CHECKING:
    from pixart.train.config import TrainConfig


def conditions_url(cfg: TrainConfig) -> str:
    return join(run_dir(cfg.output_root, cfg.run), "conditions.safetensors")


def pad_features(arrays: list, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-token T5 features ([n_i, C] each) -> padded [N, max_tokens, C] fp16 and the [N, max_tokens] mask."""
    width = arrays[0].shape[1]
    text = torch.zeros(len(arrays), max_tokens, width, dtype=torch.float16)
    mask = torch.zeros(len(arrays), max_tokens, dtype=torch.long)
    for i, a in enumerate(arrays):
        n = min(len(a), max_tokens)
        text[i, :n] = torch.from_numpy(a[:n])
        mask[i, :n] = 1
    return text, mask


class ConditionsError(PipelineError):
    """A stored conditions file that cannot be read; the message names it."""


@dataclass
class Conditions:
    null_text: torch.Tensor  # [max_tokens, C] fp16
    null_mask: torch.Tensor  # [max_tokens]
    prompt_text: torch.Tensor  # [P, max_tokens, C]
    prompt_mask: torch.Tensor  # [P, max_tokens]

    @property
    def width(self) -> int:
        return int(self.null_text.shape[-1])

    @staticmethod
    def prepare(cfg: TrainConfig, save: bool = True) -> Conditions:
        """Encode with cfg.t5_model and store (with `save`); kept when present for the same T5 and prompts. A stored
        file that cannot be read is encoded again."""
        url = conditions_url(cfg)
        if exists(url):
            try:
                found = Conditions.load(cfg)
            except ConditionsError:
                found = None
            if found is not None:
                return found
        from pixart.features.clean import clean_caption
        from pixart.features.encoders import TextEncoder

        encoder = TextEncoder(cfg.t5_model, max_tokens=cfg.data.max_tokens, device=cfg.device)
        # cleaned as the features' captions are by default (and as diffusers' pipeline cleans prompts); "" stays ""
        prompts = [clean_caption(p) for p in cfg.schedule.sample_prompts]
        found = Conditions.from_features(encoder.encode(["", *prompts]), cfg.data.max_tokens)
        if save:
            found.save(cfg)
        return found

    def stored(self, cfg: TrainConfig) -> bool:
        """Whether the run's stored conditions are these (so saving them again would change nothing)."""
        try:
            found = Conditions.load(cfg)
        except ConditionsError:
            return False
        return found is not None and all(torch.equal(a, b) for a, b in zip(vars(found).values(),
                                                                             vars(self).values(), strict=True))

    @staticmethod
    def from_features(features: list, max_tokens: int) -> Conditions:
        """From T5 features of "" (first) and the sample prompts, valid tokens only."""
        text, mask = pad_features(features, max_tokens)
        return Conditions(null_text=text[0], null_mask=mask[0], prompt_text=text[1:], prompt_mask=mask[1:])

    def save(self, cfg: TrainConfig) -> None:
        """Store as the run's conditions, tagged with the T5 and prompts they belong to."""
        tensors = {k: v.contiguous() for k, v in vars(self).items()}
        write_atomic(conditions_url(cfg), save_bytes(tensors, metadata=_identity(cfg)))

    @staticmethod
    def load(cfg: TrainConfig) -> Conditions | None:
        """The stored conditions, or None if absent or made for another T5 or other prompts."""
        url = conditions_url(cfg)
        if not exists(url):
            return None
        with open_url(url, "rb") as f:
            data = f.read()
        try:
            header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])  # safetensors: u64 length, JSON header
            if header.get("__metadata__", {}) != _identity(cfg):
                return None
            return Conditions(**load_bytes(data))
        except Exception as e:  # noqa: BLE001 - a torn or corrupt file (struct, json, safetensors, missing fields)
            raise ConditionsError(f"{url}: not readable conditions ({one_line(e)}); delete it and re-run to encode "
                                  "them again") from None

    def drop(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows where `drop` is true become the null caption (features and mask)."""
        if not drop.any():
            return text, mask
        text, mask, drop = text.clone(), mask.clone(), drop.to(text.device)
        text[drop] = self.null_text.to(text.device, text.dtype)
        mask[drop] = self.null_mask.to(mask.device, mask.dtype)
        return text, mask


def _identity(cfg: TrainConfig) -> dict[str, str]:
    prompts = hashlib.sha256("\n".join(cfg.schedule.sample_prompts).encode()).hexdigest()[:16]
    return {"t5_model": cfg.t5_model, "max_tokens": str(cfg.data.max_tokens), "prompts": prompts,
            "cleaning": "pixart-alpha"}  # conditions encoded from raw prompts (older runs) are encoded again
