"""The queries' side of NLQ features: token states of SViTT-Ego's text encoder, or of a CLIP text
model as GroundNLQ's features have them.

GroundNLQ reads CLIP ViT-B/32 text tokens made by CONE's ``clip_extractor.py``: the query cleaned
by :func:`clean_query`, OpenAI's tokenizer, the text transformer's final LayerNorm output (without
the text projection) at the tokens between the start and end tokens, 512-d. :class:`ClipText`
makes the same from a local Hugging Face ``CLIPTextModel`` folder (its ``last_hidden_state``),
stored as float32. A feature folder's manifest names its text encoder (``text_encoder``:
``svitt-ego``, or ``clip <weights digest>``), so features of two encoders are never mixed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from svitt_ego.nlq.annotations import NLQFormatError

SVITT = "svitt-ego"
CLIP_RECORD = re.compile(r"clip sha256:[0-9a-f]{64}")
TEXT_DTYPES = {SVITT: torch.float16, "clip": torch.float32}


def text_dtype(record: str) -> torch.dtype:
    """The dtype a folder's query files hold, from its manifest's ``text_encoder``."""
    return TEXT_DTYPES[record.split(" ")[0]]


def is_text_record(value) -> bool:
    return value == SVITT or (isinstance(value, str) and CLIP_RECORD.fullmatch(value) is not None)


def clean_query(text: str) -> str:
    """CONE's query cleaning before CLIP: ``strip(".").strip(" ").strip("?").lower() + "?"``."""
    return text.strip(".").strip(" ").strip("?").lower() + "?"


class SViTTText:
    """The checkpoint's own text encoder: float16 token states, ``[CLS] ... [SEP]``, padding removed."""

    dtype = torch.float16
    record = SVITT

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.dimension = model, device, model.config.text.width

    @torch.no_grad()
    def states(self, text: str) -> torch.Tensor:
        enc = self.model.tokenize([text])
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            hidden = self.model.forward_text(enc["input_ids"], enc["attention_mask"])[0]
        return hidden[enc["attention_mask"][0].bool()].half().cpu()


class ClipText:
    """A local Hugging Face ``CLIPTextModel`` and its ``CLIPTokenizer`` (one ``save_pretrained``
    folder: weights in ``model.safetensors``, the tokenizer as ``tokenizer.json`` or ``vocab.json``
    + ``merges.txt``), run in float32."""

    dtype = torch.float32

    def __init__(self, folder: str | Path, device: torch.device):
        from transformers import CLIPTextModel, CLIPTokenizer

        from svitt_ego.models.digest import weights_digest

        folder = Path(folder)
        tokenizer = ["tokenizer.json"] if (folder / "tokenizer.json").is_file() else ["vocab.json", "merges.txt"]
        missing = [name for name in ("config.json", "model.safetensors", *tokenizer) if not (folder / name).is_file()]
        if missing:
            raise NLQFormatError(f"{folder}: not a CLIP text model folder (no {', '.join(missing)}; save a "
                                 "transformers CLIPTextModel and its CLIPTokenizer there with save_pretrained)")
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = CLIPTextModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise NLQFormatError(f"{folder}: not a CLIP text model folder ({str(err).splitlines()[0]})") from None
        self.model.to(device).eval()
        self.device, self.dimension = device, self.model.config.hidden_size
        self.record = f"clip {weights_digest(self.model.state_dict())}"

    @torch.no_grad()
    def states(self, text: str) -> torch.Tensor:
        """float32 ``[L, C]``: ``last_hidden_state`` at the tokens between the start and end tokens of
        the cleaned query (cut at the model's positions, 77 for OpenAI's CLIP)."""
        ids = self.tokenizer(clean_query(text), truncation=True, max_length=self.model.config.max_position_embeddings,
                             return_tensors="pt")["input_ids"].to(self.device)
        return self.model(input_ids=ids).last_hidden_state[0, 1:-1].float().cpu()


def text_encoder(spec: list[str], model, device: torch.device):
    """The encoder ``--text`` names: ``["svitt-ego"]`` (the checkpoint's) or ``["clip", FOLDER]``."""
    if spec == [SVITT]:
        return SViTTText(model, device)
    if len(spec) == 2 and spec[0] == "clip":
        return ClipText(spec[1], device)
    raise NLQFormatError(f"--text {' '.join(spec)}: give 'svitt-ego' or 'clip FOLDER'")
