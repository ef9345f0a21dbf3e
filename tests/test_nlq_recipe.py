"""GroundNLQ's recipe per stage (defaults, docs, the schedule), its state dicts without drop path,
and outputs that do not depend on how much padding a clip gets."""

from pathlib import Path

import pytest
import torch

from svitt_ego import cli
from svitt_ego.nlq.model import GroundingConfig, GroundingModel, from_groundnlq
from svitt_ego.nlq.recipe import RECIPES, recipe_help, recipe_table
from svitt_ego.nlq.train import TrainSettings, _learning_rate
from test_nlq_model import groundnlq_reference

DOCS = Path(__file__).parents[1] / "docs" / "nlq.md"


def test_the_recipe_is_groundnlqs_configs_in_one_process():
    """By hand from GroundNLQ's configs and launch scripts: learning_rate x GPUs, batch_size x GPUs,
    init_loss_norm 200 x GPUs; epochs and warm-up as configured (trained for their sum)."""
    pretrain, finetune, scratch = RECIPES["pretrain"], RECIPES["finetune"], RECIPES["scratch"]
    assert (pretrain.lr, pretrain.batch_size, pretrain.loss_norm_init) == (pytest.approx(2e-4), 16, 800)
    assert (pretrain.warmup_epochs, pretrain.epochs, pretrain.jitter) == (4, 6, True)
    assert (finetune.lr, finetune.batch_size, finetune.loss_norm_init) == (pytest.approx(2.5e-5), 2, 200)
    assert (finetune.warmup_epochs, finetune.epochs, finetune.jitter) == (4, 6, False)
    assert (scratch.lr, scratch.batch_size, scratch.loss_norm_init) == (pytest.approx(1e-4), 4, 400)
    assert (scratch.warmup_epochs, scratch.epochs) == (5, 8)
    config = GroundingConfig(video_dim=1, text_dim=1)
    assert (config.drop_path, config.label_smoothing, config.loss_norm_init) == (0.1, 0.1, 200)


def test_the_docs_show_the_codes_recipe_table():
    assert recipe_table() in DOCS.read_text(), "docs/nlq.md: paste svitt_ego.nlq.recipe.recipe_table() again"


def _stages(argv: list[str], monkeypatch) -> list:
    seen = {}
    monkeypatch.setattr("svitt_ego.nlq.train.train_nlq", lambda features, stages, out, settings, **kw:
                        seen.update(stages=stages, settings=settings))
    assert cli.main(["train-nlq", "feats", "--output", "run", *argv]) == 0
    return seen["stages"], seen["settings"]


def test_train_nlq_defaults_are_the_recipe_per_stage(monkeypatch, capsys):
    stages, settings = _stages(["--pretrain", "n.json", "--annotations", "t.json", "v.json"], monkeypatch)
    for stage, name in zip(stages, ("pretrain", "finetune")):
        r = RECIPES[name]
        assert (stage.lr, stage.batch_size, stage.warmup_epochs, stage.epochs, stage.jitter, stage.loss_norm_init) \
            == (r.lr, r.batch_size, r.warmup_epochs, r.epochs, r.jitter, r.loss_norm_init)
    assert stages[1].annotations == ["t.json", "v.json"] and settings.max_windows is None  # whole clips
    (alone,), _ = _stages(["--annotations", "t.json", "--lr", "3e-4", "--warmup-epochs", "0"], monkeypatch)
    assert (alone.lr, alone.warmup_epochs, alone.batch_size) == (3e-4, 0, RECIPES["scratch"].batch_size)
    (pre, _), settings = _stages(["--pretrain", "n.json", "--no-jitter", "--pretrain-batch-size", "8",
                                  "--annotations", "t.json", "--max-windows", "2560"], monkeypatch)
    assert (pre.jitter, pre.batch_size, pre.lr, settings.max_windows) == (False, 8, RECIPES["pretrain"].lr, 2560)
    assert cli.main(["train-nlq", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert " ".join(recipe_help().split()) in shown and "batch 16, lr 2e-4, 4 + 6 epochs" in shown


@pytest.mark.parametrize("argv", [["--lr", "0"], ["--pretrain-batch-size", "0"], ["--warmup-epochs", "-1"]])
def test_a_recipe_value_out_of_range_is_one_line_exit_2(argv, capsys):
    assert cli.main(["train-nlq", "feats", "--output", "run", "--annotations", "t.json", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[0] in err


def test_the_schedule_counts_warmup_as_groundnlq_does():
    """GroundNLQ: max_steps = (epochs + warmup_epochs) x iterations; linear from 0 over the warm-up's
    steps (reaching lr at its last), then cosine to 1e-8 at max_steps."""
    warmup, total, lr = 4 * 10, (4 + 6) * 10, 2e-4
    assert _learning_rate(lr, 0, warmup, total) == 0.0
    assert _learning_rate(lr, warmup - 1, warmup, total) == pytest.approx(lr)
    assert _learning_rate(lr, warmup + 30, warmup, total) == pytest.approx(1e-8 + (lr - 1e-8) / 2)  # half-way


def test_a_groundnlq_state_without_drop_path_loads_and_adds_its_branches_unscaled():
    """GroundNLQ builds no AffineDropPath (no ``drop_path_*.scale``) at droppath 0: its state dict
    loads strictly into ours at drop_path 0, which has no ``gamma_*``, and in eval mode gives
    what the drop-path model gives with every scale at 1."""
    cfg, state, ref = groundnlq_reference()
    plain = {k: v for k, v in state.items() if ".drop_path_" not in k}
    assert len(plain) < len(state)
    no_drop = GroundingModel(GroundingConfig(**{**cfg.to_dict(), "drop_path": 0.0}))
    no_drop.load_state_dict(from_groundnlq(plain, no_drop.config))
    assert not [k for k in no_drop.state_dict() if "gamma_" in k]
    scaled = GroundingModel(cfg)
    scaled.load_state_dict(from_groundnlq({**plain, **{k: torch.ones_like(v) for k, v in state.items()
                                                        if ".drop_path_" in k}}, cfg))
    inputs = (ref["input/video"].float().transpose(1, 2), ref["input/video_mask"],
              ref["input/text"].float().transpose(1, 2), ref["input/text_mask"])
    with torch.no_grad():
        for a, b in zip(no_drop.eval()(*inputs), scaled.eval()(*inputs)):
            torch.testing.assert_close(a["logits"], b["logits"], atol=1e-6, rtol=0)


def test_padding_does_not_change_the_outputs():
    """The reference's second row (300 valid windows, 4 valid tokens; GroundNLQ padded it to its
    max_seq_len 512 and to the batch's 7 tokens) padded to our lengths for it (352 windows, 5
    tokens) and to 640 windows and 12 tokens: the same outputs at every valid point as GroundNLQ's.
    With the next multiple of 32 alone (320) the deepest level has no padded point and its last
    points read the array's end instead (off by 0.1); so do the query's with no padded token."""
    cfg, state, ref = groundnlq_reference()
    model = GroundingModel(cfg)
    model.load_state_dict(from_groundnlq(state, cfg))
    assert model.padded_length(300) == 352 and model.padded_length(320) == 352
    video, text = ref["input/video"].float().transpose(1, 2)[1:, :300], ref["input/text"].float().transpose(1, 2)[1:, :4]
    errors = {}
    for length, tokens in ((320, 5), (352, 5), (640, 12), (352, 4)):
        padded = torch.nn.functional.pad(video, (0, 0, 0, length - 300))
        with torch.no_grad():
            outputs = model.eval()(padded, torch.arange(length)[None] < 300,
                                   torch.nn.functional.pad(text, (0, 0, 0, tokens - 4)), torch.arange(tokens)[None] < 4)
        errors[length, tokens] = max(
            (out[key][0, :valid] - ref[f"output/{key}.{level}"][1, :valid]).abs().max().item()
            for level, out in enumerate(outputs) for valid in [int(out["mask"][0].sum())] for key in ("logits", "offsets"))
    assert errors[352, 5] < 1e-5 and errors[640, 12] < 1e-5, errors
    assert errors[320, 5] > 1e-2 and errors[352, 4] > 1e-3, errors


def test_micro_batches_take_the_batchs_step(tmp_path):
    """A batch of 6 in parts of 1 and of 4 (clips of 24, 40 and 24 windows: each part pads to its
    own length) gives the gradients, losses and normaliser of the batch at once: the gradients of
    the sums, divided by the normaliser of all the batch's positives. Drop path off (its draws
    follow the parts)."""
    from svitt_ego.nlq.features import NLQFeatures
    from svitt_ego.nlq.train import _backward, training_queries
    from test_nlq_model import SMALL, _feature_folder

    annotations = _feature_folder(tmp_path, num_clips=3, windows=[24, 40, 24])
    features = NLQFeatures(tmp_path)
    chosen = training_queries(features, [annotations])
    torch.manual_seed(0)
    model = GroundingModel(GroundingConfig(video_dim=8, text_dim=8, **{**SMALL, "drop_path": 0.0})).train()
    results = {}
    for parts in (None, 1, 4):
        model.zero_grad(set_to_none=True)
        losses = _backward(model, features, chosen, TrainSettings(micro_batch=parts), torch.device("cpu"))
        results[parts] = losses, {name: p.grad.clone() for name, p in model.named_parameters()}
    (whole, grads), normalizer = results[None], results[None][0]["normalizer"]
    assert whole["positives"] > 0 and normalizer == pytest.approx(0.9 * 200 + 0.1 * whole["positives"])
    for parts in (1, 4):
        losses, parted = results[parts]
        assert losses["normalizer"] == pytest.approx(normalizer) and losses["positives"] == whole["positives"]
        assert float(losses["loss"]) == pytest.approx(float(whole["loss"].detach()), rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(parted[name], grad, atol=1e-7, rtol=1e-4, msg=name)


def test_a_querys_outputs_do_not_depend_on_its_batch(tmp_path):
    """Clips of 24 and 40 windows, queries of 2 and 5 tokens: each row's outputs in a batch of both
    are its outputs alone (every row keeps a padded window and a padded token after its own; with
    GroundNLQ's padding the shorter row's would move)."""
    from svitt_ego.features import write_tensors
    from svitt_ego.nlq.annotations import read_nlq
    from svitt_ego.nlq.features import NLQFeatures, text_file
    from svitt_ego.nlq.train import collate
    from test_nlq_model import SMALL, _feature_folder

    annotations = _feature_folder(tmp_path, num_clips=2, windows=[24, 40])
    queries = [q for q in read_nlq(annotations).queries if q.query_idx == 0]
    write_tensors(text_file(tmp_path, queries[1]), {"states": torch.randn(5, 8).half()})
    features = NLQFeatures(tmp_path)
    torch.manual_seed(0)
    # unscaled residual branches (no drop path) and trained-like LayerNorm biases, so padding is not 0
    model = GroundingModel(GroundingConfig(video_dim=8, text_dim=8, **{**SMALL, "drop_path": 0.0})).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias, std=0.5)
    run = lambda chosen: model(*(collate(features, chosen, model.padded_length)[k]  # noqa: E731
                                 for k in ("video", "video_mask", "text", "text_mask")))
    with torch.no_grad():
        together = run(queries)
        for row, query in enumerate(queries):
            for level, (both, alone) in enumerate(zip(together, run([query]))):
                valid = int(alone["mask"][0].sum())
                torch.testing.assert_close(both["logits"][row, :valid], alone["logits"][0, :valid], atol=1e-5, rtol=0)
                torch.testing.assert_close(both["offsets"][row, :valid], alone["offsets"][0, :valid], atol=1e-5,
                                           rtol=0)
