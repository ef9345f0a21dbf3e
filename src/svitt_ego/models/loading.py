"""A model for inference from what a user names: a training checkpoint (``.pt``) or a
``save_pretrained`` folder, with ``model.`` overrides (e.g. re-inflated to more frames).

Every command that runs a trained model (evaluation, features, search, figures, fine-tuning) loads it here.
"""

from __future__ import annotations

from pathlib import Path

from svitt_ego.checkpoint import CheckpointError, load_checkpoint
from svitt_ego.config import Config, ConfigError, config_from_dict, load_config, override, parse_override
from svitt_ego.models.model import SViTTEgo


def model_overrides(overrides: list[str] | tuple) -> tuple[dict, list[str]]:
    """Split ``key=value`` overrides into a nested dict of the ``model.`` ones and the rest."""
    model, rest = {}, []
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith("model."):
            rest.append(text)
            continue
        *sections, name = key.split(".")[1:]
        node = model
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return model, rest


def load_for_eval(checkpoint: str | Path, config: str | None = None,
                  overrides: list[str] | tuple = ()) -> tuple[SViTTEgo, Config]:
    """A model (in eval mode) and its config from a training checkpoint (``.pt``) or a ``save_pretrained`` folder.

    The model's settings come from the checkpoint; ``model.`` overrides rebuild it from its
    weights (e.g. ``model.vision.num_frames=8`` re-inflates the bias tables, as
    :meth:`SViTTEgo.from_pretrained` does). The rest (data paths, batch size) comes from
    ``config`` if given, else from the training checkpoint's own config; overrides apply last.
    """
    path = Path(checkpoint)
    changes, rest = model_overrides(overrides)
    if path.is_dir():
        model = SViTTEgo.from_pretrained(path, changes)
        cfg = load_config(config) if config else Config()
    elif path.is_file():
        state = load_checkpoint(path)
        if not isinstance(state, dict) or not {"config", "model"} <= state.keys():
            raise CheckpointError(f"{path}: not a training checkpoint (a mapping with 'config' and 'model')")
        try:
            saved = config_from_dict(state["config"])
        except ConfigError as err:
            raise ConfigError(f"{path}: its config: {err}", err.key) from None
        cfg = load_config(config) if config else saved
        model = SViTTEgo.from_state_dict(saved.model, state["model"], str(path), changes)
    else:
        raise CheckpointError(f"{path}: no such checkpoint (a .pt file or a save_pretrained folder)")
    cfg.model = model.config
    return model, override(cfg, rest)
