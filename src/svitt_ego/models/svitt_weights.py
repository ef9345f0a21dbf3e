"""SViTT's checkpoints (JerryYLi/svitt, and SViTT-Ego's, written by the same code) as our model folders.

SViTT's ``tasks/pretrain.py`` saves ``torch.save({"model": state_dict, "optimizer": ..., "scheduler": ...,
"scaler": ..., "config": DictConfig, "epoch": ..., "global_step": ...})``. The file is read with
``torch.load(weights_only=True)``: its OmegaConf ``config`` is rebuilt from inert stand-ins of OmegaConf's
classes (objects that only hold the state the pickle gives them) and read into plain dicts, so neither
OmegaConf nor anything else named in the file runs. The state dict is mapped to ours by
:data:`PARTS` and the HF BEiT / BERT tables of :mod:`svitt_ego.models.weights`; SViTT's derived copies
(relative position indices, BERT's position ids, the tied MLM decoder) are checked against what they
must equal and dropped; anything else we cannot place is refused, naming it. The model config comes from
the tensors' shapes and the checkpoint's ``config`` (docs/svitt_checkpoints.md lists what is read).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from svitt_ego.checkpoint import CheckpointError, load_checkpoint
from svitt_ego.config import Config, ConfigError, ModelConfig, TextConfig, VisionConfig, parse_override, validate
from svitt_ego.data.tokenizer import read_vocab
from svitt_ego.models.model import SViTTEgo
from svitt_ego.models.position_bias import CLS_POSITION, RelativePositionBias3D
from svitt_ego.models.weights import beit_to_video_encoder, bert_to_svitt
from svitt_ego.untrusted import one_line

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading the file


class _Inert:
    """Stands in for an OmegaConf class while unpickling: holds the state the pickle gives it, runs nothing.
    Unpickling makes it without calling it (``cls.__new__``); a pickle that calls it is refused."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("a pickle called an OmegaConf class (SViTT's config only names them)")

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})


def _empty_mapping(*_args) -> dict:
    """Stands in for ``collections.defaultdict(dict)`` (OmegaConf's resolver cache): an empty dict."""
    return {}


_OMEGACONF_NAMES = ["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
                    "omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata", "typing.Any"] + [
    f"omegaconf.nodes.{name}" for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                           "EnumNode", "BytesNode", "PathNode", "ValueNode", "InterpolationResultNode")]
# Types OmegaConf's metadata names as values (a node's element type, ...): inert stand-ins too.
_TYPE_NAMES = [f"builtins.{name}" for name in ("dict", "list", "int", "float", "str", "bool", "bytes", "object")]
OMEGACONF_STAND_INS = [(_Inert, name) for name in _OMEGACONF_NAMES + _TYPE_NAMES] + [
    (_empty_mapping, "collections.defaultdict")]


def plain(value):
    """A value read with :data:`OMEGACONF_STAND_INS` as plain dicts, lists and scalars; an interpolation
    (``${...}``) stays the string it is, a missing value (``???``) is None."""
    if isinstance(value, _Inert):
        state = value.__dict__
        if "_content" in state:
            return plain(state["_content"]) if isinstance(state["_content"], (dict, list)) else state["_content"]
        return plain(state.get("_val"))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return None if value == "???" else value


def read_svitt_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and plain config of a SViTT checkpoint, read without running code.

    Recognised layouts: SViTT's dict (``model``), a ``state_dict`` dict, or a bare state dict; a
    ``module.`` prefix (DistributedDataParallel) is removed. Anything else is a :class:`CheckpointError`.
    """
    ckpt = load_checkpoint(path, allowed=OMEGACONF_STAND_INS)
    state, config = ckpt, {}
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                state, config = ckpt[key], plain(ckpt.get("config")) or {}
                break
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v)
                                                            for k, v in state.items()):
        top = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a SViTT checkpoint (no 'model' or 'state_dict' mapping of names to "
                              f"tensors, nor a bare one; found {top})")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the checkpoint's 'config' is not a mapping")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, config


# --------------------------------------------------------------------------- the key table

# SViTT's top-level modules -> ours. The video encoder is HF BEiT's layout and the text encoder HF BERT's
# (``BertForMaskedLM``: ``bert.`` + ``cls.``; a retrieval model's ``BertModel``: neither), whose tables
# live in svitt_ego.models.weights; the rest are renamed as they stand.
PARTS = {"vision_encoder.": "visual.", "text_encoder.": "", "vision_layernorm.": "visual.norm.",
         "vision_proj.": "vision_proj.", "text_proj.": "text_proj.", "itm_head.": "vtm_head.", "temp": "temp"}
# SViTT's parameters for settings we do not reproduce, and the setting each one means.
UNSUPPORTED = {"vision_encoder.embeddings.position_embeddings": "BEiT use_absolute_position_embeddings",
               "vision_encoder.layernorm.weight": "BEiT use_mean_pooling=false ([CLS] pooling)",
               "vision_encoder.encoder.relative_position_bias.relative_position_bias_table":
                   "BEiT use_shared_relative_position_bias"}


def split_parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``state`` by the top-level module of :data:`PARTS`; a key under none of them goes to ``""``."""
    parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in PARTS}
    parts[""] = {}
    for key, value in state.items():
        prefix = next((p for p in PARTS if key.startswith(p) or key == p), "")
        parts[prefix][key.removeprefix(prefix) if prefix else key] = value
    return parts


def check_derived(state: dict[str, torch.Tensor], vision: VisionConfig, source: str) -> dict[str, torch.Tensor]:
    """``state`` without SViTT's derived copies, each checked against what it must equal: the relative
    position indices (our table layout), BERT's position ids, the tied MLM decoder."""
    state = dict(state)
    bias = RelativePositionBias3D(vision.num_frames, vision.grid_size, 1)
    positions = torch.arange(CLS_POSITION, vision.num_patches)
    index = bias.index(positions[:, None], positions[None, :])
    text = "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in state) else "text_encoder."
    expected = {k: index for k in state if k.endswith("relative_position_bias.relative_position_index")}
    if f"{text}embeddings.position_ids" in state:
        expected[f"{text}embeddings.position_ids"] = torch.arange(
            state[f"{text}embeddings.position_embeddings.weight"].shape[0])[None]
    mlm = "text_encoder.cls.predictions."
    for key, tied in ((f"{mlm}decoder.weight", f"{text}embeddings.word_embeddings.weight"),
                      (f"{mlm}decoder.bias", f"{mlm}bias")):
        if key in state:
            expected[key] = state.get(tied)
    for key, value in expected.items():
        got = state.pop(key)
        if value is None or got.shape != value.shape or not torch.equal(got.to(value.dtype), value):
            raise CheckpointError(f"{source}: '{key}' is not what SViTT derives it from (a {vision.num_frames}-frame "
                                  f"{vision.grid_size}x{vision.grid_size} grid, tied weights); not converted")
    return state


def svitt_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str,
                  allow_unused: bool = False) -> dict[str, torch.Tensor]:
    """SViTT's state dict in our names; shapes are checked when the model loads it."""
    for key, setting in UNSUPPORTED.items():
        if key in state:
            raise CheckpointError(f"{source}: '{key}' means SViTT ran with {setting}, which this model does not "
                                  "reproduce; not converted")
    parts = split_parts(check_derived(state, cfg.vision, source))
    out = {f"visual.{k}": v for k, v in beit_to_video_encoder(parts.pop("vision_encoder."), cfg.vision).items()}
    out.update(bert_to_svitt(parts.pop("text_encoder."), cfg.text))
    for prefix in PARTS:
        out.update({PARTS[prefix] + k: v for k, v in parts.pop(prefix, {}).items()})
    with torch.device("meta"):
        own = set(SViTTEgo(cfg).state_dict())
    source_name = {id(v): k for k, v in state.items()}  # unplaced tensors pass through the tables as they are
    unused = [source_name.get(id(v), k) for k, v in out.items() if k not in own] + list(parts[""])
    if unused and not allow_unused:
        raise CheckpointError(f"{source}: {len(unused)} tensors have no place in the model: {', '.join(unused[:8])}"
                              f"{' ...' if len(unused) > 8 else ''} (--allow-unused drops them)")
    if unused:
        log.warning("%s", one_line(f"{source}: dropped {len(unused)} tensors with no place in the model: "
                                   f"{', '.join(unused[:8])}"))
    return {k: v for k, v in out.items() if k in own}


# --------------------------------------------------------------------------- the model config


def _layers(state: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _section(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"the checkpoint's config: '{key}' is not a mapping")
    return value


def _number(config: dict, path: str, default):
    """``config``'s value at the dotted ``path`` if it is a plain number (not an interpolation), else ``default``."""
    value = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def vision_config(state: dict[str, torch.Tensor], config: dict) -> VisionConfig:
    """The video encoder's sizes from the tensors, its sparsity from ``config['vision_encoder_args']``."""
    args = _section(config, "vision_encoder_args")
    width = state["vision_encoder.embeddings.cls_token"].shape[-1]
    patch = state["vision_encoder.embeddings.patch_embeddings.projection.weight"].shape[-1]
    layer = "vision_encoder.encoder.layer.0."
    frames, grid = _frames_and_grid(state, layer, _number(config, "image_res", 224) // patch)
    table = state[f"{layer}attention.attention.relative_position_bias.relative_position_bias_table"]
    cfg = VisionConfig(image_size=grid * patch, patch_size=patch, width=width, num_heads=table.shape[1],
                       num_frames=frames,
                       depth=len(_layers(state, r"vision_encoder\.encoder\.layer\.(\d+)\.")),
                       mlp_ratio=state[f"{layer}intermediate.dense.weight"].shape[0] / width,
                       layer_norm_eps=float(args.get("layer_norm_eps", 1e-12)),
                       drop_path=float(args.get("drop_path_rate", 0.1)), pooling="mean", svitt_blocks=True)
    _sparsity(cfg, args)
    return cfg


def _frames_and_grid(state: dict[str, torch.Tensor], layer: str, grid: int) -> tuple[int, int]:
    """SViTT's frames T and patch grid G from the bias table's rows, ``(2T-1)(2G-1)^2 + 3``, and its index's
    size, ``T G^2 + 1`` (without the index, G is ``grid``: the config's image_res over the patch size)."""
    bias = f"{layer}attention.attention.relative_position_bias."
    rows = state[f"{bias}relative_position_bias_table"].shape[0] - 3
    index = state.get(f"{bias}relative_position_index")
    tokens = None if index is None else index.shape[0] - 1
    for g in [grid] if tokens is None else [g for g in range(1, tokens + 1) if tokens % (g * g) == 0]:
        frames = (rows // (2 * g - 1) ** 2 + 1) // 2
        if (2 * frames - 1) * (2 * g - 1) ** 2 == rows and tokens in (None, frames * g * g):
            return frames, g
    given = f"a {grid}x{grid} grid" if tokens is None else f"{tokens} tokens (its index)"
    raise CheckpointError(f"the relative position table ({rows + 3} rows) fits no number of frames on {given}")


# SViTT settings (in vision_encoder_args / text_encoder_args) whose other values we do not reproduce.
ONLY = {"vision_encoder_args": {"hidden_act": "gelu", "num_cls_tokens": 1},
        "text_encoder_args": {"hidden_act": "gelu", "position_embedding_type": "absolute"}}


def _refuse_unreproduced(config: dict) -> None:
    for section, settings in ONLY.items():
        for key, value in settings.items():
            got = _section(config, section).get(key, value)
            if got != value:
                raise ConfigError(f"{section}.{key}={got}: SViTT ran with a setting this model does not reproduce "
                                  f"(only {value}); not converted")


def _sparsity(cfg: VisionConfig, args: dict) -> None:
    """SViTT's edge and node sparsity settings (``vision_encoder_args``) as ours; one we do not reproduce
    is refused, naming it."""
    order = args.get("token_3d_order", "none")
    if order not in ("none", "zcurve", "hilbert"):
        raise ConfigError(f"vision_encoder_args.token_3d_order={order}: not an order SViTT's code knows")
    cfg.token_order = "raster" if order == "none" else order
    keep = float(args.get("token_keep_rate", 1))
    if keep < 1 and args.get("token_keep_strategy", "cls_attn") != "cls_attn":
        raise ConfigError(f"vision_encoder_args.token_keep_strategy={args['token_keep_strategy']}: only cls_attn "
                          "is reproduced; not converted")
    cfg.keep_rate, cfg.prune_layers = keep, [int(i) for i in args.get("token_drop_loc", [3, 6, 9])] if keep < 1 else []
    if args.get("sparse_random_attn") is None:
        cfg.attention = "dense"
        return
    cfg.k_local, cfg.k_random = int(args.get("sparse_local_attn", 1)), int(args["sparse_random_attn"])
    cfg.block_size = int(args.get("attn_block_size", 1))
    if cfg.k_local != 1:
        raise ConfigError(f"vision_encoder_args.sparse_local_attn={cfg.k_local}: SViTT's local blocks wrap "
                          "around and score block m+r's keys against block m-r's values; only 1 is reproduced")


def text_config(state: dict[str, torch.Tensor], config: dict, text_heads: int) -> TextConfig:
    """BERT's sizes from the tensors (its heads from ``text_encoder_args`` or ``text_heads``), the text
    length from ``max_txt_l``, no multimodal pruning unless ``text_encoder_args`` asks for it."""
    args = _section(config, "text_encoder_args")
    bert = "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in state) else "text_encoder."
    words = state[f"{bert}embeddings.word_embeddings.weight"]
    layers = _layers(state, re.escape(bert) + r"encoder\.layer\.(\d+)\.")
    fusion = _layers(state, re.escape(bert) + r"encoder\.layer\.(\d+)\.crossattention\.")
    max_length = _number(config, "max_txt_l.video", _number(config, "max_txt_l", 32))
    cfg = TextConfig(vocab_size=words.shape[0], width=words.shape[1], depth=len(layers),
                     num_fusion_layers=len(fusion), num_heads=int(args.get("num_attention_heads", text_heads)),
                     intermediate_size=state[f"{bert}encoder.layer.0.intermediate.dense.weight"].shape[0],
                     max_position_embeddings=state[f"{bert}embeddings.position_embeddings.weight"].shape[0],
                     type_vocab_size=state[f"{bert}embeddings.token_type_embeddings.weight"].shape[0],
                     layer_norm_eps=float(args.get("layer_norm_eps", 1e-12)), max_length=int(max_length),
                     keep_rate=1.0, mlm_head="text_encoder.cls.predictions.bias" in state)
    keep = float(args.get("token_keep_rate", 1))
    if keep < 1:
        first = len(layers) - len(fusion)
        where, strategy = list(args.get("token_drop_loc", [9])), args.get("token_keep_strategy", "cls_attn")
        if where != [first] or strategy != "cls_attn":
            raise ConfigError(f"text_encoder_args: multimodal pruning at layers {where} by {strategy}: only "
                              f"cls_attn in the first fusion layer ({first}) is reproduced; not converted")
        cfg.keep_rate = keep
    return cfg


def svitt_model_config(state: dict[str, torch.Tensor], config: dict, text_heads: int = 12) -> ModelConfig:
    """Our model config for SViTT's ``state`` and plain ``config`` (see :func:`read_svitt_checkpoint`)."""
    for key in ("vision_encoder.embeddings.cls_token", "vision_proj.weight", "temp"):
        if key not in state:
            raise CheckpointError(f"not a SViTT checkpoint: no '{key}' (it has {', '.join(sorted(state)[:5])}, ...)")
    _refuse_unreproduced(config)
    if not config:
        log.warning("the checkpoint holds no config: dense attention, no pruning, 32 text tokens, %d BERT heads "
                    "unless KEY=VALUE settings say otherwise", text_heads)
    return ModelConfig(vision=vision_config(state, config), text=text_config(state, config, text_heads),
                       embed_dim=state["vision_proj.weight"].shape[0], temperature=float(state["temp"]),
                       learn_temperature=True)


def svitt_vocab(vocab: str | Path | None, config: dict, vocab_size: int) -> str:
    """The folder of the BERT ``vocab.txt``: ``vocab``, else the checkpoint's ``text_encoder`` when that is a
    local folder; checked against the word embeddings."""
    folder = vocab or config.get("text_encoder")
    if not folder or not (Path(folder) / "vocab.txt").is_file():
        where = f"--vocab {vocab}" if vocab else f"the checkpoint's text_encoder {folder!r}"
        raise FileNotFoundError(f"no BERT vocabulary: {where} is not a local folder with vocab.txt; give --vocab "
                                "FOLDER (SViTT uses bert-base-uncased's)")
    read_vocab(Path(folder) / "vocab.txt", vocab_size)
    return str(folder)


def model_overrides(texts: list[str]) -> dict:
    """``["model.vision.k_random=5"]`` -> ``{"vision": {"k_random": 5}}``; a key outside ``model.`` is refused."""
    nested: dict = {}
    for text in texts:
        key, value = parse_override(text)
        if not key.startswith("model."):
            raise ConfigError(f"{key}: only model.* settings describe a converted model", key)
        *parents, last = key.split(".")[1:]
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def convert_svitt(checkpoint: str | Path, output: str | Path, vocab: str | Path | None = None,
                  overrides: dict | None = None, text_heads: int = 12, allow_unused: bool = False) -> Path:
    """Write SViTT's ``checkpoint`` as our model folder ``output`` (a new or empty folder), loadable by
    :meth:`SViTTEgo.from_pretrained`, with the BERT vocabulary of :func:`svitt_vocab`; ``overrides`` (as
    there, e.g. :func:`model_overrides`) change the model config after it is read; ``text_heads`` is
    BERT's head count when the checkpoint's config does not give it."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output}: exists and is not an empty folder; convert-svitt writes a new one")
    state, config = read_svitt_checkpoint(checkpoint)
    try:
        cfg = svitt_model_config(state, config, text_heads)
        validate(Config(model=cfg))
    except KeyError as err:
        raise CheckpointError(f"{checkpoint}: not a SViTT checkpoint: no '{err.args[0]}'") from None
    except (CheckpointError, ConfigError) as err:
        raise type(err)(f"{checkpoint}: {err}") from None
    except (ValueError, TypeError) as err:  # e.g. an interpolation where its config should hold a number
        raise ConfigError(f"{checkpoint}: a value of its config cannot be read ({err})") from None
    cfg.text.tokenizer = svitt_vocab(vocab, config, cfg.text.vocab_size)
    ours = svitt_to_ours(state, cfg, str(checkpoint), allow_unused)
    model = SViTTEgo.from_state_dict(cfg, ours, str(checkpoint), overrides)
    return model.save_pretrained(output)
