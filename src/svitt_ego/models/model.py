"""SViTT-Ego: video encoder, text encoder, multimodal (fusion) encoder and heads.

- Dual encoder: ``encode_video`` / ``encode_text`` give L2-normalised
  ``embed_dim`` vectors for contrastive learning and retrieval.
- Multimodal: the text tokens cross-attend to the video tokens in the fusion
  layers; ``vtm_logits`` (video-text matching, 2-way on the [CLS]) and
  ``mlm_logits`` (masked language modelling) read its output.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svitt_ego.atomic import atomic_copy, atomic_write, atomic_write_json, fsync_folder, staging_path
from svitt_ego.checkpoint import CheckpointError
from svitt_ego.config import Config, ConfigError, ModelConfig, apply, validate
from svitt_ego.data.errors import load_json
from svitt_ego.data.tokenizer import load_tokenizer, read_vocab, tokenize, vocab_file
from svitt_ego.device import to_device
from svitt_ego.models.position_bias import RelativePositionBias3D
from svitt_ego.models.text import FusionEncoder, MLMHead, TextEncoder, init_bert_weights, text_query_weights
from svitt_ego.models.video import VideoEncoder, VideoOutput
from svitt_ego.models.weights import load_checked, read_state_dict, resize_video_bias_tables

CONFIG_NAME = "svitt_ego_config.json"
WEIGHTS_NAME = "model.safetensors"
SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, "vocab.txt")
# The learned contrastive temperature is clamped to this range, as in SViTT.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 0.5


class SViTTEgo(nn.Module):
    """SViTT-Ego: a sparse BEiT video encoder (``visual``), a BERT text encoder (``text``), a BERT
    multimodal encoder whose layers cross-attend to the video tokens (``fusion``), projections to the
    shared embedding space and the VTM and MLM heads.

    Build it with :func:`create_model` (initialising from BEiT / BERT folders) or
    :meth:`from_pretrained`; ``forward_*`` / ``*_logits`` are the pieces the pretraining
    objective combines, ``encode_video`` / ``encode_text`` the dual encoder for retrieval.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.visual = VideoEncoder(cfg.vision)
        self.text = TextEncoder(cfg.text)
        self.fusion = FusionEncoder(cfg.text, video_width=cfg.vision.width)
        self.mlm_head = MLMHead(cfg.text) if cfg.text.mlm_head else None
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim)
        self.vtm_head = nn.Linear(cfg.text.width, 2)
        init_bert_weights(nn.ModuleList([self.vision_proj, self.text_proj, self.vtm_head]))
        self.text.embeddings.word_embeddings.weight.requires_grad_(not cfg.text.freeze_word_embeddings)
        temp = torch.tensor(float(cfg.temperature))
        if cfg.learn_temperature:
            self.temp = nn.Parameter(temp)
        else:
            self.register_buffer("temp", temp)
        self._tokenizer = None

    @property
    def temperature(self) -> torch.Tensor:
        """The contrastive temperature, clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
        return self.temp.clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters with two or more dimensions that take no weight decay: the [CLS]
        token and the relative position bias tables (timm's convention; parameters with fewer than
        two dimensions, biases, norms, layer scales and the temperature, take none either)."""
        tables = {f"{name}.table" for name, m in self.named_modules() if isinstance(m, RelativePositionBias3D)}
        return tables | {"visual.cls_token"}

    # Video ----------------------------------------------------------------
    def forward_video(self, frames: torch.Tensor) -> VideoOutput:
        """Normalised frames [B, T, 3, H, W] -> tokens, pooled vector and the kept patch positions."""
        return self.visual(frames)

    def video_embedding(self, video: VideoOutput) -> torch.Tensor:
        return F.normalize(self.vision_proj(video.pooled), dim=-1)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> [B, embed_dim], L2-normalised."""
        return self.video_embedding(self.forward_video(frames))

    # Text -----------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.text)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        device = self.text_proj.weight.device
        return to_device(tokenize(self.tokenizer, texts, self.config.text.max_length), device)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> unimodal text hidden states [B, L, C]."""
        return self.text(input_ids, attention_mask)

    def text_embedding(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.text.pooling == "mean":
            mask = attention_mask[..., None].to(text_hidden.dtype)
            pooled = (text_hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = text_hidden[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_text(self, texts: list[str] | torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Strings or token ids [B, L] -> [B, embed_dim], L2-normalised."""
        if isinstance(texts, torch.Tensor):
            ids, mask = texts, attention_mask if attention_mask is not None else torch.ones_like(texts)
        else:
            enc = self.tokenize(texts)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        return self.text_embedding(self.forward_text(ids, mask), mask)

    # Multimodal -----------------------------------------------------------
    def vtm_logits(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
                   video_tokens: torch.Tensor) -> torch.Tensor:
        """Video-text matching logits [B, 2] (index 1 = match) for aligned text and video rows, from the
        fused [CLS] state or the masked mean of the fused text states (``model.text.fusion_pooling``)."""
        fused = self.fusion(text_hidden, attention_mask, video_tokens).hidden
        weights = text_query_weights(attention_mask, self.config.text.fusion_pooling).to(fused.dtype)
        return self.vtm_head(torch.einsum("bl,blc->bc", weights, fused))

    def mlm_logits(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor,
                   video_tokens: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits [B, L, V] for masked text, conditioned on the video.

        With ``select`` (bool [B, L]) only those positions go through the
        vocabulary projection, and the result is [num_selected, V].
        """
        if self.mlm_head is None:
            raise ConfigError("this model has no MLM head (model.text.mlm_head=false: converted from a retrieval "
                              "checkpoint); masked language modelling needs one")
        text_hidden = self.forward_text(masked_ids, attention_mask)
        hidden = self.fusion(text_hidden, attention_mask, video_tokens).hidden
        if select is not None:
            hidden = hidden[select]
        return self.mlm_head(hidden, self.text.embeddings.word_embeddings.weight)

    # Saving and loading ---------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``svitt_ego_config.json``, ``model.safetensors`` and the tokenizer's ``vocab.txt``.

        The files go into a fresh folder beside ``folder`` (fsynced), which then takes its place:
        ``folder`` never holds a mix of two models or a partial one. The old folder is moved aside
        only once the new one is complete beside it, and a save killed in between is finished by
        :func:`recover_pretrained` at the next save or load. A ``folder`` holding anything else is
        refused rather than replaced.
        """
        folder = Path(folder)
        recover_pretrained(folder)
        others = sorted(p.name for p in folder.iterdir() if p.name not in SAVED_FILES) if folder.is_dir() else []
        if others:
            raise FileExistsError(f"{folder} holds other files ({', '.join(others[:5])}); save_pretrained replaces "
                                  "the whole folder, so give it a new or empty one")
        folder.parent.mkdir(parents=True, exist_ok=True)
        ready, retired = _swap_names(folder)
        staging = staging_path(folder, suffix="")  # journaled in a held run folder (svitt_ego.run_folder)
        staging.mkdir(mode=0o755)
        try:
            self._write_pretrained(staging)
            shutil.rmtree(ready, ignore_errors=True)
            os.replace(staging, ready)  # a complete new model: recover_pretrained puts it in place after a kill
            if folder.exists():
                shutil.rmtree(retired, ignore_errors=True)
                os.replace(folder, retired)
            os.replace(ready, folder)
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        fsync_folder(folder.parent)
        return folder

    def _write_pretrained(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        vocab = vocab_file(self.config.text)
        if vocab is not None:
            atomic_copy(vocab, folder / "vocab.txt")
        atomic_write_json(folder / CONFIG_NAME, Config(model=self.config).to_dict()["model"])

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: dict | None = None) -> "SViTTEgo":
        """Load a :meth:`save_pretrained` folder.

        ``overrides`` changes the model config before the weights load, e.g.
        ``{"vision": {"num_frames": 8}}`` re-inflates a 4-frame checkpoint to 8
        frames (the bias tables are interpolated along time) or
        ``{"vision": {"k_random": 5}}`` changes the sparsity.

        The model comes back in eval mode (dropout and drop path off), as transformers' models do:
        call ``.train()`` before fine-tuning it.

        A config, weights file or vocabulary that is missing, not a regular file or malformed,
        or a config whose sizes do not fit the weights (checked before the model is built), is a
        one-line error naming the file.
        """
        folder = Path(folder)
        recover_pretrained(folder)
        if not (folder / CONFIG_NAME).exists():
            raise CheckpointError(f"{folder}: not a saved model (no {CONFIG_NAME})")
        cfg = model_config_from_dict(load_json(folder / CONFIG_NAME, CheckpointError, "model config"),
                                     str(folder / CONFIG_NAME))
        if (folder / "vocab.txt").exists():
            cfg.text.tokenizer = str(folder)
            read_vocab(folder / "vocab.txt", cfg.text.vocab_size)
        return cls.from_state_dict(cfg, read_state_dict(folder), str(folder), overrides)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                        overrides: dict | None = None) -> "SViTTEgo":
        """A model of config ``cfg`` (changed by ``overrides``, as in :meth:`from_pretrained`) holding
        ``state``, the weights of a model of config ``cfg`` (checked by :func:`check_fits` before
        the model is built), in eval mode."""
        check_fits(cfg, state, source)
        if overrides:
            cfg = model_config_from_dict(_merge(cfg, overrides), "overrides")
        cfg.text.tokenizer = cfg.text.tokenizer or cfg.text.pretrained  # the weights come from ``state``
        cfg.vision.pretrained = cfg.text.pretrained = None
        model = cls(cfg)
        state = dict(state)
        resize_video_bias_tables(state, cfg.vision, prefix="visual.")
        report = load_checked(model, state, source)
        if report.missing or report.unexpected:
            raise CheckpointError(f"{source}: checkpoint does not match the model: missing "
                                  f"{report.missing[:5]}, unexpected {report.unexpected[:5]}")
        return model.eval()

    def describe(self) -> str:
        """Parameter counts per part, in millions."""
        parts = {"video encoder": self.visual, "text encoder": self.text, "multimodal encoder": self.fusion}
        lines = [f"{name:20s} {_count(m) / 1e6:8.1f} M" for name, m in parts.items()]
        lines.append(f"{'heads':20s} {(_count(self) - sum(_count(m) for m in parts.values())) / 1e6:8.1f} M")
        lines.append(f"{'total':20s} {_count(self) / 1e6:8.1f} M")
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if trainable < _count(self):
            lines.append(f"{'trainable':20s} {trainable / 1e6:8.1f} M")
        return "\n".join(lines)


def _swap_names(folder: Path) -> tuple[Path, Path]:
    """Beside ``folder``: where a complete new model waits to take its place, and where the old one
    goes meanwhile."""
    return folder.with_name(f".{folder.name}.ready"), folder.with_name(f".{folder.name}.retired")


def recover_pretrained(folder: str | Path) -> None:
    """Finish a :meth:`SViTTEgo.save_pretrained` killed between moving the old model away and
    moving the new one in: put the new one (complete) in place, else the old one."""
    folder = Path(folder)
    if os.path.lexists(folder):
        return
    for candidate in _swap_names(folder):
        if candidate.is_dir() and not candidate.is_symlink():
            os.replace(candidate, folder)
            fsync_folder(folder.parent)
            return


def check_fits(cfg: ModelConfig, state: dict, source: str) -> None:
    """Refuse ``cfg`` unless a model of it holds tensors of exactly the names and shapes of
    ``state``, without allocating one: the layer counts are read from the names first (a
    depth of millions would take long to build even empty), then the model is built on the meta
    device and compared tensor by tensor. So sizes from an untrusted file (widths, frames, the
    vocabulary) can ask for no more memory than its weights already take."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{source}: the weights are not a mapping of names to tensors")
    layers = {"model.vision.depth": (cfg.vision.depth, r"visual\.blocks\.(\d+)\."),
              "model.text.depth - model.text.num_fusion_layers": (cfg.text.num_text_layers, r"text\.layers\.(\d+)\."),
              "model.text.num_fusion_layers": (cfg.text.num_fusion_layers, r"fusion\.layers\.(\d+)\.")}
    for key, (wanted, pattern) in layers.items():
        found = len({m.group(1) for name in state if (m := re.match(pattern, name))})
        if found != wanted:
            raise CheckpointError(f"{source}: the config does not fit the weights: {key} is {wanted}, the weights "
                                  f"have {found} such layers")
    with torch.device("meta"):
        needed = {k: tuple(v.shape) for k, v in SViTTEgo(cfg).state_dict().items()}
    missing, unexpected = [k for k in needed if k not in state], [k for k in state if k not in needed]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the config does not fit the weights: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    wrong = [k for k, shape in needed.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"{source}: the config does not fit the weights: '{wrong[0]}' is "
                              f"{tuple(state[wrong[0]].shape)} in the weights, {needed[wrong[0]]} in a model of the "
                              f"config ({len(wrong)} tensors differ)")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _merge(cfg: ModelConfig, overrides: dict) -> dict:
    data = Config(model=cfg).to_dict()["model"]

    def merge(base: dict, new: dict) -> dict:
        for k, v in new.items():
            base[k] = merge(dict(base[k]), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    return merge(data, overrides)


def model_config_from_dict(data: dict, source: str) -> ModelConfig:
    try:
        cfg = Config()
        apply(cfg.model, data, prefix="model.")
        return validate(cfg).model
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def create_model(cfg: ModelConfig, load_pretrained: bool = True) -> SViTTEgo:
    """Build SViTT-Ego; with ``load_pretrained``, initialise from the model folder ``cfg.init_from`` (whose
    vocabulary becomes the tokenizer, unless the config names one), else from the BEiT / BERT folders."""
    from svitt_ego.data.tokenizer import resolve_text_folder
    from svitt_ego.models.weights import load_beit, load_bert

    if load_pretrained and cfg.init_from:
        if cfg.text.tokenizer is None and (Path(cfg.init_from) / "vocab.txt").exists():
            cfg.text.tokenizer = cfg.init_from
        model = SViTTEgo(cfg)
        load_model_folder(model, cfg.init_from)
        return model
    model = SViTTEgo(cfg)
    if load_pretrained and cfg.vision.pretrained:
        load_beit(model.visual, cfg.vision.pretrained)
    if load_pretrained and cfg.text.pretrained:
        load_bert(model, resolve_text_folder(cfg.text.pretrained))
    return model


def load_model_folder(model: SViTTEgo, folder: str | Path) -> None:
    """Load the weights of a :meth:`SViTTEgo.save_pretrained` folder into ``model``, whose sizes must be the
    folder's (a tensor that does not fit is named); the bias tables are resized to its number of frames."""
    folder = Path(folder)
    recover_pretrained(folder)
    if not (folder / CONFIG_NAME).exists():
        raise CheckpointError(f"model.init_from={folder}: not a saved model (no {CONFIG_NAME})")
    state = dict(read_state_dict(folder))
    resize_video_bias_tables(state, model.config.vision, prefix="visual.")
    report = load_checked(model, state, str(folder))
    if report.missing or report.unexpected:
        raise CheckpointError(f"model.init_from={folder}: the folder's weights do not fit the model: missing "
                              f"{report.missing[:5]}, unexpected {report.unexpected[:5]}")
