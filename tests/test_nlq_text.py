"""GroundNLQ's text features: a local CLIP text model's token states by CONE's rule, recorded in
the manifest and never mixed with another encoder's."""

import json
import string

import pytest
import torch

from svitt_ego.cli import main
from svitt_ego.nlq.annotations import NLQQuery
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.text import ClipText, clean_query
from test_nlq_feature_rules import _extract, world  # noqa: F401 (a fixture)

CHARS = string.ascii_lowercase + "?.!,'"
MERGES = ["o p", "op e", "ope n</w>", "t h", "th e</w>"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random 1-layer CLIPTextModel of width 512 and a CLIPTokenizer with a tiny BPE vocabulary
    (characters, the same ending a word, and the merges' results), saved by save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*CHARS, *(c + "</w>" for c in CHARS), *(m.replace(" ", "") for m in MERGES)]:
        vocab.setdefault(token, len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=512, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=8, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(root / "clip")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root / "clip")
    return root / "clip", model, vocab


def _reference(model, vocab, tokens: list[str]) -> torch.Tensor:
    """CONE's way: the tokens between start and end, in a row padded with 0 to 77 positions, the
    text transformer's last hidden states at them (its attention is causal: the padding after the
    end token cannot change them)."""
    ids = [0, *(vocab[t] for t in tokens), 1]
    row = torch.tensor([ids + [0] * (77 - len(ids))])
    with torch.no_grad():
        return model(input_ids=row).last_hidden_state[0, 1:len(ids) - 1]


def test_clip_token_states_follow_cones_rule(clip_folder):
    folder, model, vocab = clip_folder
    assert clean_query(" When did I open the drawer?..") == "when did i open the drawer?"
    assert clean_query("Where is the cup. ") == "where is the cup.?"  # the dot goes only before the space
    tokens = ["w", "h", "e", "n</w>", "d", "i", "d</w>", "i</w>", "open</w>", "the</w>", "d", "r", "a", "w", "e",
              "r</w>", "?</w>"]
    states = ClipText(folder, torch.device("cpu")).states(" When did I open the drawer?..")
    assert states.dtype == torch.float32 and states.shape == (len(tokens), 512)
    torch.testing.assert_close(states, _reference(model, vocab, tokens), atol=1e-5, rtol=0)


def test_clip_text_features_are_extracted_trained_on_and_kept_apart(world, clip_folder, tmp_path, capsys):  # noqa: F811
    folder, model, vocab = clip_folder
    out = tmp_path / "clipf"
    assert _extract(world, out, "run1/model", "--text", "clip", folder) == 0
    features = NLQFeatures(out)
    assert features.manifest["text_dimension"] == 512 and features.manifest["text_encoder"].startswith("clip sha256:")
    cup = features.text(NLQQuery("c2", "shared", 0, "where is the cup?", None, None))
    tokens = ["w", "h", "e", "r", "e</w>", "i", "s</w>", "the</w>", "c", "u", "p</w>", "?</w>"]
    torch.testing.assert_close(cup, _reference(model, vocab, tokens), atol=1e-5, rtol=0)
    capsys.readouterr()
    assert _extract(world, out) == 2  # resumed with SViTT-Ego's text encoder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_encoder 'clip sha256:" in err and "-> 'svitt-ego'" in err

    answered = json.loads((world.root / "nlq.json").read_text())
    for clip in answered["videos"][0]["clips"]:
        clip["annotations"][0]["language_queries"][0].update(clip_start_sec=0.2, clip_end_sec=0.8)
    (tmp_path / "answered.json").write_text(json.dumps(answered))
    assert main(["train-nlq", str(out), "--annotations", str(tmp_path / "answered.json"), "--output",
                 str(tmp_path / "run"), "--epochs", "1", "--warmup-epochs", "0"]) == 0  # reads 512-d text
    svitt = tmp_path / "svittf"
    assert _extract(world, svitt) == 0
    capsys.readouterr()
    predict = ["predict-nlq", str(svitt), "--model", str(tmp_path / "run" / "last.pt"), "--annotations",
               str(world.root / "nlq.json"), "--output", str(tmp_path / "p.json")]
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text features of dimension 512" in err
    assert main(["train-nlq", str(svitt), "--annotations", str(tmp_path / "answered.json"), "--output",
                 str(tmp_path / "run"), "--epochs", "2", "--warmup-epochs", "0", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_encoder 'clip sha256:" in err and "-> 'svitt-ego'" in err
    assert main(["predict-nlq", str(out), *predict[2:]]) == 0


@pytest.mark.parametrize("files", [[], ["config.json"], ["config.json", "model.safetensors", "vocab.json"]])
def test_a_folder_that_is_not_a_clip_model_is_one_line_exit_2(world, tmp_path, files, capsys):  # noqa: F811
    for name in files:
        (tmp_path / "clip" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "clip" / name).write_text("{}")
    capsys.readouterr()
    assert _extract(world, tmp_path / "f", "run1/model", "--text", "clip", tmp_path / "clip") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a CLIP text model folder" in err and str(tmp_path / "clip") in err
    assert _extract(world, tmp_path / "g", "run1/model", "--text", "bert") == 2
