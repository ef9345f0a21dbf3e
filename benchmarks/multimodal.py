"""The multimodal encoder of a trained model: EgoMCQ by each score, the re-ranking weight, q_m.

1. The weight of ``--score both`` (dual + weight * VTM log-odds), picked on pseudo-EgoMCQ questions
   made from the training split (egoclip.csv: each query clip with four clips of other videos, or
   four clips of its own video with other narrations), never on the evaluation questions.
2. EgoMCQ (the evaluation file) by ``dual`` (the anchor), ``vtm`` and ``both`` at that weight.
3. Multimodal pruning: held-out VTM accuracy and EgoMCQ by ``vtm`` with the model's q_m
   (``model.text.keep_rate``), with q_m = 0.1 and with q_m = 1 (no pruning).

    PYTHONPATH=src python benchmarks/multimodal.py demo_run/run/last.pt demo_run/toy_data
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from svitt_ego.data.egoclip import read_egoclip
from svitt_ego.eval.egomcq import (VTM_WEIGHT, combine_scores, egomcq_accuracy, egomcq_choice_scores, egomcq_score,
                                   evaluate_egomcq_scores, format_egomcq)
from svitt_ego.models.loading import load_for_eval
from svitt_ego.fusion_checks import heldout_clips, heldout_pairs, video_tokens, vtm_accuracy

WEIGHTS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def _row(clip) -> dict:
    return {"video_uid": clip.video_uid, "clip_start": float(clip.clip_start), "clip_end": float(clip.clip_end),
            "clip_text": clip.clip_text}


def training_questions(egoclip: str, num_questions: int, seed: int = 0) -> dict:
    """EgoMCQ-format questions on training clips: half inter-video, half intra-video (the query's own
    video, other narrations; skipped where the video has fewer than four)."""
    table = read_egoclip(egoclip)
    rng = np.random.default_rng(seed)
    questions = {}
    for index in rng.permutation(len(table)):
        query = table.iloc[index]
        kind = 1 + len(questions) % 2
        if kind == 1:
            others = table[table.video_uid != query.video_uid]
        else:
            others = table[(table.video_uid == query.video_uid) & (table.clip_text != query.clip_text)]
        if len(others) < 4:
            continue
        wrong = [others.iloc[i] for i in rng.choice(len(others), 4, replace=False)]
        answer = int(rng.integers(5))
        choices = wrong[:answer] + [query] + wrong[answer:]
        questions[str(len(questions))] = {"query": _row(query), "choices": {str(i): _row(c) for i, c in
                                                                            enumerate(choices)},
                                          "answer": answer, "types": kind}
        if len(questions) == num_questions:
            break
    return questions


def pick_weight(model, cfg, device, num_questions: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train_questions.json"
        path.write_text(json.dumps(training_questions(cfg.data.egoclip, num_questions)))
        cfg.data.egomcq, evaluation = str(path), cfg.data.egomcq
        scores, answers, types = egomcq_choice_scores(model, cfg, device, with_vtm=True)
        cfg.data.egomcq = evaluation
    print(f"training split, {len(answers)} pseudo-questions: mean accuracy of dual + w * vtm")
    means = {}
    for weight in WEIGHTS:
        means[weight] = egomcq_score(egomcq_accuracy(combine_scores(scores, "both", weight), answers, types))
        print(f"  w = {weight:<5g} {means[weight]:5.1f}%")
    vtm_only = egomcq_score(egomcq_accuracy(scores["vtm"], answers, types))
    print(f"  vtm only  {vtm_only:5.1f}%")
    return max(WEIGHTS, key=lambda w: (round(means[w], 6), w))  # ties: the largest, VTM breaking near-ties


def pruning(model, cfg, device) -> None:
    clips = heldout_clips(cfg.data.egomcq)
    print(f"multimodal pruning ({model.config.text.num_fusion_layers} fusion layer(s); q_m prunes the video "
          "tokens the fusion layers after the first see)")
    for keep_rate in dict.fromkeys([model.config.text.keep_rate, 0.1, 1.0]):
        model.fusion.keep_rate = keep_rate
        tokens = video_tokens(model, cfg, clips, device)
        vtm = vtm_accuracy(model, heldout_pairs(clips), tokens)
        mcq = evaluate_egomcq_scores(model, cfg, device, scores=("vtm",))["vtm"]
        print(f"  q_m = {keep_rate:<5g} held-out VTM accuracy {vtm['accuracy']:5.1f}%, "
              f"EgoMCQ by vtm inter {mcq['inter']:5.1f}% intra {mcq['intra']:5.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("toy_data")
    parser.add_argument("--questions", type=int, default=300, help="pseudo-questions from the training split")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = [f"data.egoclip={args.toy_data}/egoclip.csv", f"data.egomcq={args.toy_data}/egomcq.json",
            f"data.video_root={args.toy_data}/videos"]
    model, cfg = load_for_eval(args.checkpoint, None, [*data, *args.overrides])
    device = torch.device("cpu")
    model.eval()
    weight = pick_weight(model, cfg, device, args.questions)
    print(f"picked w = {weight} (the code's default VTM_WEIGHT = {VTM_WEIGHT})", flush=True)
    results = evaluate_egomcq_scores(model, cfg, device, vtm_weight=weight)
    print(format_egomcq({f"by {score} (%)": result for score, result in results.items()}), flush=True)
    pruning(model, cfg, device)


if __name__ == "__main__":
    main()
