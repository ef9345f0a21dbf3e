"""GroundNLQ's training recipe for Ego4D NLQ, per stage: the one statement of ``train-nlq``'s defaults.

Each row is the config GroundNLQ's README runs for that stage (houzhijian/GroundNLQ, commit
cb51e54), turned into one process: GroundNLQ multiplies the configured learning rate by the
number of GPUs, each GPU draws its own batch, and DDP averages the GPUs' gradients, each
normalised by its own loss normaliser (initially 200). One process with the GPUs' batches
together and the normaliser's start multiplied by the GPUs takes the same steps (up to the
normaliser's moving average seeing one count where the GPUs saw several). ``docs/nlq.md``
shows :func:`recipe_table` (a test checks it is this table) and ``train-nlq --help`` its lines.
Plain Python: the command line reads it without loading torch.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

# The same in every GroundNLQ Ego4D config: the grounding model's defaults (GroundingConfig).
LOSS_NORM_PER_GPU = 200.0  # init_loss_norm
DROP_PATH, LABEL_SMOOTHING = 0.1, 0.1  # droppath, label_smoothing


@dataclass(frozen=True)
class Recipe:
    config: str           # GroundNLQ's config file
    gpus: int             # processes its README's command starts
    lr_per_gpu: float     # the config's learning_rate
    batch_per_gpu: int    # the config's batch_size
    epochs: int           # after the warm-up: GroundNLQ trains epochs + warmup_epochs
    warmup_epochs: int
    jitter: bool          # enable_temporal_jittering

    @property
    def lr(self) -> float:
        return self.lr_per_gpu * self.gpus

    @property
    def batch_size(self) -> int:
        return self.batch_per_gpu * self.gpus

    @property
    def loss_norm_init(self) -> float:
        return LOSS_NORM_PER_GPU * self.gpus


RECIPES = {
    "pretrain": Recipe("ego4d_narrations_nlq_internvideo.yaml", 4, 5e-5, 4, 6, 4, True),
    "finetune": Recipe("ego4d_nlq_v2_pretrain_finetune_internvideo_2.5e-5.yaml", 1, 2.5e-5, 2, 6, 4, False),
    "scratch": Recipe("ego4d_nlq_v2_internvideo_1e-4.yaml", 2, 5e-5, 2, 8, 5, False),
}
STAGE_NAMES = {"pretrain": "narration pretraining (--pretrain)", "finetune": "fine-tuning (--annotations after "
               "--pretrain)", "scratch": "from scratch (--annotations alone)"}


def number(x: float) -> str:
    """``2e-4``, ``2.5e-5``, ``200``: short, and the way GroundNLQ's config names write rates."""
    if x >= 1e-3:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def recipe_table() -> str:
    """The recipe as a Markdown table: one row per stage, GroundNLQ's values and ours."""
    lines = ["| stage | GroundNLQ config | its GPUs x batch, lr per GPU | train-nlq batch, lr | epochs (warm-up + "
             "after) | jitter | loss normaliser from | drop path | label smoothing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in RECIPES.items():
        lines.append(f"| {STAGE_NAMES[name]} | `{r.config}` | {r.gpus} x {r.batch_per_gpu}, {number(r.lr_per_gpu)} | "
                     f"{r.batch_size}, {number(r.lr)} | {r.warmup_epochs} + {r.epochs} | "
                     f"{'on' if r.jitter else 'off'} | {number(r.loss_norm_init)} | {number(DROP_PATH)} | "
                     f"{number(LABEL_SMOOTHING)} |")
    return "\n".join(lines)


def recipe_help(width: int = 100) -> str:
    """The recipe in words, for ``train-nlq --help``."""
    lines = [textwrap.fill("Each stage's defaults are GroundNLQ's recipe for it, in one process; epochs are "
                           "warm-up + after it (docs/nlq.md#the-recipe):", width)]
    for name, r in RECIPES.items():
        lines.append(textwrap.fill(
            f"{STAGE_NAMES[name]}: batch {r.batch_size}, lr {number(r.lr)}, {r.warmup_epochs} + {r.epochs} epochs, "
            f"jitter {'on' if r.jitter else 'off'}, loss normaliser from {number(r.loss_norm_init)}; GroundNLQ's "
            f"{r.config}: {r.gpus} x batch {r.batch_per_gpu} at {number(r.lr_per_gpu)}",
            width, initial_indent="  ", subsequent_indent="    "))
    lines.append(textwrap.fill(f"Drop path {number(DROP_PATH)} and label smoothing {number(LABEL_SMOOTHING)} in "
                               "every stage; the model kept is the plain one (GroundNLQ evaluates its state_dict, "
                               "not its EMA).", width))
    return "\n".join(lines)
