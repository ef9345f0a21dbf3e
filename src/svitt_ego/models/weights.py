"""Weight loading: Hugging Face BEiT and BERT folders, and our own checkpoints.

Each source is mapped to our parameter names by one function
(:func:`beit_to_video_encoder`, :func:`bert_to_svitt`), then loaded by
:func:`load_checked`, which refuses a parameter whose shape does not fit and
reports every missing or unexpected key instead of dropping it silently.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from svitt_ego.checkpoint import CheckpointError
from svitt_ego.config import TextConfig, VisionConfig
from svitt_ego.data.errors import regular_file
from svitt_ego.models.position_bias import resize_bias_table

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model parameters the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint entries the model has no place for


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` or ``pytorch_model.bin`` from a Hugging Face style folder. A
    safetensors file that is not a regular file, or is truncated or malformed, is a
    :class:`CheckpointError` naming it."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = regular_file(folder / "model.safetensors", CheckpointError, "safetensors file")
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    return json.loads(path.read_text())


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                 new: tuple[str, ...] = (), scope: tuple[str, ...] = ("",)) -> LoadReport:
    """Load ``state`` into ``module``; shapes must fit, other mismatches are reported.

    Only the module's entries under ``scope`` (name prefixes) are expected from
    this checkpoint. Missing keys under ``new`` are parts that start untrained
    (e.g. cross-attention) and are logged at info level; everything else
    missing or unexpected at warning level.
    """
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(f"{source}: parameter '{key}' does not fit: checkpoint shape "
                             f"{tuple(value.shape)}, model shape {tuple(own[key].shape)}")
    report = LoadReport(source=source,
                        loaded=[k for k in state if k in own],
                        missing=[k for k in own if k.startswith(scope) and k not in state],
                        unexpected=[k for k in state if k not in own])
    module.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    fresh = [k for k in report.missing if k.startswith(new)]
    other = [k for k in report.missing if not k.startswith(new)]
    log.info("%s: loaded %d tensors", source, len(report.loaded))
    if fresh:
        log.info("%s: %d tensors start untrained: %s", source, len(fresh), _summary(fresh))
    if other:
        log.warning("%s: %d model tensors missing from the checkpoint: %s", source, len(other), _summary(other))
    if report.unexpected:
        log.warning("%s: %d checkpoint tensors not used: %s", source, len(report.unexpected),
                    _summary(report.unexpected))
    return report


def _summary(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def resize_video_bias_tables(state: dict[str, torch.Tensor], cfg: VisionConfig, prefix: str = "") -> None:
    """Inflate (1 frame) or interpolate (T1 frames) every bias table in ``state`` to ``cfg.num_frames``."""
    spatial = (2 * cfg.grid_size - 1) ** 2
    for key in [k for k in state if k.startswith(prefix) and k.endswith("rel_pos_bias.table")]:
        rows = state[key].shape[0] - 3
        if rows % spatial or (rows // spatial) % 2 == 0:
            wanted = ((2 * cfg.num_frames - 1) * spatial + 3, state[key].shape[1])
            raise CheckpointError(f"parameter '{key}' does not fit: checkpoint shape {tuple(state[key].shape)}, "
                             f"model shape {wanted} (no number of frames on a {cfg.grid_size}x{cfg.grid_size} "
                             "grid gives the checkpoint's rows)")
        frames = (rows // spatial + 1) // 2
        state[key] = resize_bias_table(state[key], frames, cfg.num_frames, cfg.grid_size)


_BEIT_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "lambda_1": "gamma_1", "lambda_2": "gamma_2",
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.0", "output.dense": "mlp.2",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.rel_pos_bias.table",
}


def beit_to_video_encoder(state: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face BEiT state dict (``BeitModel`` or ``BeitFor*``) to :class:`VideoEncoder` names.

    q/k/v are fused into ``qkv`` (BEiT has no k bias), a shared bias table is
    added to every layer's own (BEiT adds both when it has both), and the
    tables are inflated to ``cfg.num_frames``.
    Entries with no counterpart keep their name (and are reported as unused).
    """
    state = {k.removeprefix("beit."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    shared = None
    for name in ("shared_position_bias.relative_position_bias_table",  # transformers >= 4.42
                 "encoder.relative_position_bias.relative_position_bias_table"):
        shared = state.pop(name, shared)
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if m is None:
            simple = {"embeddings.cls_token": "cls_token", "embeddings.patch_embeddings.projection.weight":
                      "patch_embed.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
                      "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
                      "pooler.layernorm.weight": "fc_norm.weight", "pooler.layernorm.bias": "fc_norm.bias"}
            out[simple.get(key, key)] = value
            continue
        layer, rest = int(m.group(1)), m.group(2)
        qkv_m = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if qkv_m:
            qkv.setdefault(layer, {})[f"{qkv_m.group(1)}.{qkv_m.group(2)}"] = value
            continue
        for hf_name, ours in _BEIT_LAYER.items():
            if rest == hf_name or rest.startswith(hf_name + "."):
                out[f"blocks.{layer}.{ours}{rest[len(hf_name):]}"] = value
                break
        else:
            out[key] = value
    for layer, parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([parts["query.weight"], parts["key.weight"],
                                                            parts["value.weight"]])
        out[f"blocks.{layer}.attn.q_bias"] = parts["query.bias"]
        out[f"blocks.{layer}.attn.v_bias"] = parts["value.bias"]
        if shared is not None:
            key = f"blocks.{layer}.attn.rel_pos_bias.table"
            out[key] = out[key] + shared if key in out else shared
    resize_video_bias_tables(out, cfg)
    return out


def load_beit(encoder: nn.Module, folder: str | Path) -> LoadReport:
    """Initialise a :class:`VideoEncoder` from a Hugging Face BEiT folder, inflated to video."""
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    if hf.get("use_absolute_position_embeddings"):
        log.warning("%s: absolute position embeddings are not used by the video encoder", folder)
    state = beit_to_video_encoder(read_state_dict(folder), encoder.cfg)
    return load_checked(encoder, state, str(folder))


def bert_to_svitt(state: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face BERT state dict to the text encoder, fusion layers and MLM head.

    Layers ``i < num_text_layers`` go to ``text.layers.i``, the rest to
    ``fusion.layers.(i - num_text_layers)``; ``cls.predictions`` to ``mlm_head``
    (its decoder is tied to the word embeddings). Entries with no counterpart
    keep their name (and are reported as unused).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias")
        if key == "embeddings.position_ids" or key.startswith("cls.predictions.decoder."):
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if m:
            i = int(m.group(1))
            if i < cfg.num_text_layers:
                out[f"text.layers.{i}.{m.group(2)}"] = value
            else:
                out[f"fusion.layers.{i - cfg.num_text_layers}.{m.group(2)}"] = value
        elif key.startswith("embeddings."):
            out[f"text.{key}"] = value
        elif key.startswith("cls.predictions."):
            out[key.replace("cls.predictions.", "mlm_head.")] = value
        else:
            out[key] = value
    return out


def load_bert(model: nn.Module, folder: str | Path) -> LoadReport:
    """Initialise the text encoder, fusion layers and MLM head of :class:`SViTTEgo` from a BERT folder.

    The cross-attention of the fusion layers and the MLM head (when the
    checkpoint has none) start untrained.
    """
    state = bert_to_svitt(read_state_dict(folder), model.config.text)
    fresh = tuple(f"fusion.layers.{i}.crossattention." for i in range(len(model.fusion.layers)))
    return load_checked(model, state, str(folder), new=fresh + ("mlm_head.",),
                        scope=("text.", "fusion.", "mlm_head."))
