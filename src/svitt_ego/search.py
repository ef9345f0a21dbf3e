"""``svitt-ego search``: zero-shot search of any videos with the dual encoder.

**Moments.** Every window of a video is embedded as ``encode_video`` embeds a clip (the pooled
feature through the video projection, L2-normalised) and scored by its cosine with the query's
``encode_text`` embedding. A moment is a run of ``2 ** j`` windows (1 to 32) chosen by how much its
windows stand out from their surroundings (:func:`run_contrast`: inside mean less outside mean; the
inside mean alone never prefers a run to its best window); a video's best moments are kept with
non-maximum suppression, then scored and ranked across videos by their match with the query
(:func:`match_score`: the inside mean, which a video's scene cuts do not raise). The windows come
from a feature folder (:mod:`svitt_ego.features`), either given or made once per video and
extraction setting in a cache folder (:func:`cached_features`).

**Clips.** Each clip of a folder is one embedding, its model's frames spread over the whole clip
(:func:`svitt_ego.eval.embed.embed_clips`): texts rank clips and clips rank texts; with a file of
true pairs the command reports Recall@1/5/10 both ways (:func:`recall_at`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from svitt_ego.atomic import refuse_input_as_output
from svitt_ego.data.errors import MetadataError
from svitt_ego.features import (FORMAT, MANIFEST, FeatureFolder, FeatureFolderError, Settings, WindowExtractor,
                                check_numbers, expected_tensors, extract_into, feature_file, is_chunk_folder,
                                is_complete, list_videos, load_model, manifest_header, model_of, model_settings,
                                open_video, video_identity)
from svitt_ego.run_folder import run_folder, start_afresh
from svitt_ego.search_page import Moment, QueryResult, browser_playable, format_time
from svitt_ego.untrusted import printable, shown

log = logging.getLogger(__name__)

MOMENT_LENGTHS = (1, 2, 4, 8, 16, 32)  # windows
STRIP_FRAMES = 4  # frames shown per moment on the page and the contact sheet
RECALL_AT = (1, 5, 10)
MODES = ("moments", "clips")
ENTRY_DIGEST = "entry.json"  # a complete cache entry's seal


# --------------------------------------------------------------------------- moments of windows


def segment_iou(one: torch.Tensor, many: torch.Tensor) -> torch.Tensor:
    """IoU of the interval ``one`` ``[2]`` with each of ``many`` ``[N, 2]`` (0 for empty unions)."""
    inter = (torch.minimum(one[1], many[:, 1]) - torch.maximum(one[0], many[:, 0])).clamp(min=0)
    union = torch.maximum(one[1], many[:, 1]) - torch.minimum(one[0], many[:, 0])
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def window_embeddings(model, features: torch.Tensor) -> torch.Tensor:
    """[T, D] pooled video features -> [T, embed_dim], L2-normalised as ``encode_video`` does."""
    return F.normalize(model.vision_proj(features.float()), dim=-1)


def run_contrast(scores: torch.Tensor, length: int) -> torch.Tensor:
    """Each run of ``length`` windows scored by AutoLoc's outer-inner contrast (Shou et al., ECCV 2018): the
    mean score inside less the mean over a margin of ``length / 4`` windows (at least one) on either side,
    cut at the video's ends; 0 for a run with nothing outside it."""
    total = torch.cat([torch.zeros(1, dtype=torch.float64), scores.double().cumsum(0)])
    first = torch.arange(len(scores) - length + 1)
    stop, margin = first + length, max(1, round(length / 4))
    low, high = (first - margin).clamp(min=0), (stop + margin).clamp(max=len(scores))
    inside = (total[stop] - total[first]) / length
    outside_sum, outside = total[first] - total[low] + total[high] - total[stop], first - low + high - stop
    return inside - torch.where(outside > 0, outside_sum / outside.clamp(min=1), inside)


def best_moments(scores: torch.Tensor, top_k: int, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """The ``top_k`` best runs ``(first, last, contrast)`` of windows by :func:`run_contrast`; a run
    overlapping a better one by ``iou_threshold`` or more is dropped.

    The work is bounded whatever ``top_k``: no more runs than exist are kept, and a run is compared only
    with the kept runs that can overlap it, those starting less than the longest run before it (at most
    ``2 * 32`` starts of 6 lengths each), so suppression costs O(runs) after the sort."""
    spans, values = [], []
    for length in MOMENT_LENGTHS:
        if length > len(scores):
            break
        starts = torch.arange(len(scores) - length + 1)
        spans.append(torch.stack([starts, starts + length - 1], 1))
        values.append(run_contrast(scores, length))
    spans, values = torch.cat(spans).tolist(), torch.cat(values)
    chosen: list[int] = []
    kept_at: dict[int, list[int]] = {}  # first window -> the kept runs starting there
    for i in values.argsort(descending=True).tolist():
        first, last = spans[i]
        near = (j for start in range(first - MOMENT_LENGTHS[-1] + 1, last + 1) for j in kept_at.get(start, ()))
        if all(_run_iou(spans[i], spans[j]) < iou_threshold for j in near):
            chosen.append(i)
            kept_at.setdefault(first, []).append(i)
            if len(chosen) == top_k:
                break
    return [(*spans[i], float(values[i])) for i in chosen]


def _run_iou(one: list[int], other: list[int]) -> float:
    """IoU of two runs of windows, each covering ``[first, last + 1)`` (as :func:`segment_iou` computes it)."""
    inter = max(0, min(one[1], other[1]) - max(one[0], other[0]) + 1)
    return inter / (max(one[1], other[1]) - min(one[0], other[0]) + 1)


def match_score(scores: torch.Tensor, first: int, last: int) -> float:
    """How well the run ``[first, last]`` of windows matches the query: the mean of its windows' scores
    (cosines). Unlike the contrast that chose the run, it does not depend on the rest of its video, so
    moments of different videos compare: a video with scene cuts, whose scores step up and down whatever
    the query, gets no lead from them."""
    return float(scores[first:last + 1].double().mean())


def moment_seconds(features: FeatureFolder, key: str, first: int, last: int) -> tuple[float, float]:
    """A run of windows in seconds: from half a stride before its first centre to half after its last."""
    return (float(features.to_seconds(key, first - 0.5)), float(features.to_seconds(key, last + 0.5)))


def searchable(features: FeatureFolder) -> FeatureFolder:
    """``features`` if its rows can be scored against a text (pooled or projected); else one line."""
    if features.manifest["what"] == "tokens":
        raise FeatureFolderError(f"{features.folder / MANIFEST}: holds 'tokens' features, which have no joint-space "
                                 "embedding; search needs 'pooled' or 'projected' ones (extract-features --what)")
    return features


def video_embeddings(model, features: FeatureFolder, key: str) -> torch.Tensor:
    """The joint-space embedding ``[T, embed_dim]`` of each window of video ``key``."""
    rows = features.features(key).float()
    return window_embeddings(model, rows) if features.manifest["what"] == "pooled" else F.normalize(rows, dim=-1)


@torch.no_grad()
def text_embeddings(model, texts: list[str]) -> torch.Tensor:
    return model.cpu().eval().encode_text(list(texts)).float()


def video_path(features: FeatureFolder, key: str) -> str:
    """The file (or chunk folder) a video's features came from when it is still there; else its name."""
    source = features.info(key)["source"]
    return source if Path(source).exists() else key


@torch.no_grad()
def search_folder(model, features: FeatureFolder, queries: torch.Tensor, top_k: int,
                  keys: list[str] | None = None) -> list[list[Moment]]:
    """Per query (rows of ``queries``, text embeddings) the ``top_k`` best moments of each video of
    ``features`` (or of ``keys``), within the video's length; frames are not read."""
    found: list[list[Moment]] = [[] for _ in queries]
    for key in keys if keys is not None else features.keys():
        info = features.info(key)
        length = info["frames"] / info["fps"]
        scores = video_embeddings(model, features, key) @ queries.T
        for q in range(len(queries)):
            column = scores[:, q].contiguous()
            for first, last, _ in best_moments(column, top_k):
                start, end = moment_seconds(features, key, first, last)
                found[q].append(Moment(video_path(features, key), max(start, 0.0), min(end, length),
                                       match_score(column, first, last)))
    return found


# --------------------------------------------------------------------------- the cache of raw videos


def cache_identity(path: Path, digest: str, settings: Settings, chunk_seconds: float) -> dict:
    """Everything a video's features depend on: :func:`~svitt_ego.features.video_identity`, the weights
    digest, every extraction setting and the format."""
    return {**video_identity(path), "weights_digest": digest, **asdict(settings), "chunk_seconds": chunk_seconds,
            "format": FORMAT}


def cache_key(identity: dict) -> str:
    """The name of a video's cache entry: the sha256 of the canonical JSON of its :func:`cache_identity`."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def entry_digests(entry: Path, key: str) -> dict[str, str | None]:
    """The sha256 of each file of cache entry ``entry`` that its seal covers (None: missing)."""
    files = (entry / MANIFEST, feature_file(entry, key))
    return {str(f.relative_to(entry)): file_digest(f) if f.is_file() else None for f in files}


def seal_entry(entry: Path, key: str, identity: dict) -> None:
    """Seal a complete cache entry (written last): its source identity and the sha256 of its files."""
    from svitt_ego.atomic import atomic_write_json

    atomic_write_json(entry / ENTRY_DIGEST, {"identity": identity, "files": entry_digests(entry, key)})


def is_cached(entry: Path, key: str, header: dict, identity: dict) -> bool:
    """Whether ``entry`` is sealed and holds the complete features of ``key`` made with ``header``'s
    settings and weights from the video of ``identity`` (:func:`check_entry`); one that is sealed but
    does not is logged."""
    if not (entry / ENTRY_DIGEST).is_file():
        return False  # new, or never finished
    try:
        check_entry(entry, key, header, identity)
    except (FeatureFolderError, OSError) as err:
        log.warning("%s; extracting it again", err)
        return False
    return True


def check_entry(entry: Path, key: str, header: dict, identity: dict) -> None:
    """One line unless ``entry``'s seal names ``identity`` and the sha256 of its files as they are, its
    manifest has ``header``'s settings and weights and names the video of ``identity`` as ``key``'s
    source, and the features file holds what the manifest says."""
    from svitt_ego.data.errors import load_json

    sealed = load_json(entry / ENTRY_DIGEST, FeatureFolderError, "cache entry seal")
    if sealed != {"identity": identity, "files": entry_digests(entry, key)}:
        raise FeatureFolderError(f"{entry}: its files or its video differ from what its {ENTRY_DIGEST} says")
    manifest = FeatureFolder(entry).manifest
    info = manifest["videos"].get(key)
    if (any(manifest.get(k) != v for k, v in header.items() if k != "checkpoint") or info is None
            or info.get("identity") != {k: identity[k] for k in ("video", "size", "mtime_ns")}
            or str(Path(info["source"]).resolve()) != identity["video"]
            or not is_complete(feature_file(entry, key), expected_tensors(manifest, info["windows"]))):
        raise FeatureFolderError(f"{entry}: does not hold the features of {identity['video']} its {ENTRY_DIGEST} "
                                 "names")


@dataclass(frozen=True)
class Extraction:
    """How ``svitt-ego search`` reads raw videos: the settings of ``extract-features`` (None: its defaults)."""
    window: int | None = None
    stride: int | None = None
    frames: int | None = None
    fps: float | None = None
    batch_size: int = 32
    device: str = "cpu"
    chunk_seconds: float = 600.0


def cached_features(checkpoint: str | Path, videos: dict[str, Path], cache: str | Path, how: Extraction):
    """The model, ``[(folder, key)]`` of every readable video's features in ``cache`` (made there when
    missing: one feature folder per video and setting, through :func:`extract_into`) and ``{video: why}``
    of the unreadable ones. Prints what it reused and extracted."""
    check_numbers(window=how.window, stride=how.stride, frames=how.frames, batch_size=how.batch_size)
    model, digest = load_model(checkpoint, how.frames)
    settings = model_settings(model, "pooled", how.window, how.stride, how.fps)
    extractor = WindowExtractor(model, settings, how.batch_size, how.device)
    header = manifest_header(checkpoint, digest, settings, extractor.shape)
    found, failed, reused = [], {}, 0
    for key, path in videos.items():
        if not (path.is_file() or is_chunk_folder(path)):
            failed[str(path)] = f"{path}: no such video file or chunk folder"
            continue
        identity = cache_identity(path, digest, settings, how.chunk_seconds)
        entry = Path(cache) / cache_key(identity)
        if entry.is_symlink():
            raise FeatureFolderError(f"{entry} is a symbolic link; a cache entry is a folder svitt-ego search made: "
                                     "remove it")
        with run_folder(entry, "search", wait=_waiting_for(entry)):  # one search extracts it, others wait
            if is_cached(entry, key, header, identity):
                reused += 1
                print(f"reused {entry} for {printable(path)}")
            else:
                start_afresh(entry, "search")  # an entry search made: emptied; anything else: refused
                manifest = extract_into(entry, header, {key: lambda path=path: open_video(path, how.chunk_seconds)},
                                        extractor, command="search", summary=False)
                if key in manifest["failed"]:
                    failed[str(path)] = manifest["failed"][key]
                    continue
                seal_entry(entry, key, identity)
                print(f"extracted {printable(path)} into {entry}")
            found.append((FeatureFolder(entry), key))
    print(f"cache {cache}: {reused} reused, {len(found) - reused} extracted, {len(failed)} unreadable"
          + "".join(f"\n  {printable(why)}" for why in failed.values()))
    return model, found, failed


def _waiting_for(entry: Path):
    return lambda holder: print(f"waiting for another search to finish {entry} ({holder})", flush=True)


# --------------------------------------------------------------------------- frames for the page


def moment_frames(path: str, start: float, end: float, count: int = STRIP_FRAMES,
                  chunk_seconds: float = 600.0) -> list[np.ndarray]:
    """``count`` frames evenly inside ``[start, end]`` of the video at ``path`` (a file or chunk folder);
    none when it cannot be read."""
    from svitt_ego.data.video import VideoReadError

    if not Path(path).exists():
        return []
    times = start + (np.arange(count) + 0.5) * (end - start) / count
    try:
        return list(open_video(path, chunk_seconds).read(times).numpy())
    except VideoReadError as err:
        log.warning("no frames for the page: %s", err)
        return []


def add_frames(results: list[QueryResult], chunk_seconds: float = 600.0) -> list[QueryResult]:
    """Each moment's frame strip and whether a browser plays its video."""
    playable: dict[str, bool] = {}
    for result in results:
        for m in result.moments:
            m.frames = moment_frames(m.video, m.start, m.end, chunk_seconds=chunk_seconds)
            if m.video not in playable:
                playable[m.video] = browser_playable(m.video)
            m.playable = playable[m.video]
    return results


# --------------------------------------------------------------------------- svitt-ego search (moments)


def is_feature_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def ranked(texts: list[str], per_query: list[list[Moment]]) -> list[QueryResult]:
    return [QueryResult(text, sorted(moments, key=lambda m: -m.score)) for text, moments in zip(texts, per_query)]


def search_videos(checkpoint: str | Path, source: str | Path, queries: list[str], top_k: int = 5,
                  cache: str | Path | None = None, how: Extraction = Extraction()
                  ) -> tuple[list[QueryResult], dict[str, str]]:
    """Per query, the ``top_k`` best moments of every video of ``source``, best first, and the unreadable
    videos ``{video: why}``. ``source`` is a feature folder (``checkpoint`` must hold the weights its
    features came from; its own settings apply) or whatever :func:`~svitt_ego.features.list_videos`
    takes; raw videos need ``cache``, where they are extracted with ``how``."""
    if not queries:
        raise MetadataError("give at least one QUERY")
    if is_feature_folder(source):
        features = searchable(FeatureFolder(source))
        model = model_of(features.manifest, str(features.folder / MANIFEST), checkpoint)
        return ranked(queries, search_folder(model, features, text_embeddings(model, queries), top_k)), {}
    videos = list_videos([source])
    if cache is None:
        raise MetadataError(f"{source}: raw videos need --cache DIR, the folder their features are extracted into "
                            "once (or give a feature folder)")
    model, found, failed = cached_features(checkpoint, videos, cache, how)
    embedded = text_embeddings(model, queries)
    per_query: list[list[Moment]] = [[] for _ in queries]
    for features, key in found:
        for q, moments in enumerate(search_folder(model, features, embedded, top_k, [key])):
            per_query[q] += moments
    return ranked(queries, per_query), failed


def searched_videos(source: str | Path) -> list[str]:
    """The videos a search of ``source`` reads: a feature folder's sources, or the videos listed."""
    if is_feature_folder(source):
        return [info["source"] for info in FeatureFolder(source).manifest["videos"].values()]
    return [str(path) for path in list_videos([source]).values()]


def format_moments(results: list[QueryResult]) -> str:
    """A table per query: rank, video, start and end (seconds and m:ss.s), score."""
    lines = []
    for result in results:
        width = _name_width(result)
        lines += [f"query: {printable(result.query)}",
                  f"{'rank':>4s}  {'video':{width}s}{'start':>9s}{'end':>9s}  {'m:ss.s':19s}{'score':>7s}"]
        lines += [f"{rank:>4d}  {_name(m):{width}s}{m.start:>9.2f}{m.end:>9.2f}  "
                  f"{format_time(m.start) + ' - ' + format_time(m.end):19s}{m.score:>7.3f}"
                  for rank, m in enumerate(result.moments, start=1)]
        lines += ["  (no moments)"] if not result.moments else []
    return "\n".join(lines)


def _name(moment: Moment) -> str:
    """A moment's file name as printed: escaped (a name may hold a terminal's escape sequences)."""
    return printable(Path(moment.video).name)


def _name_width(result: QueryResult) -> int:
    return max([12] + [len(_name(m)) + 2 for m in result.moments])


# --------------------------------------------------------------------------- svitt-ego search --mode clips


@dataclass
class Pairs:
    """True (text, clip) pairs: ``texts`` (each once, in file order) and ``truth[t, c]``."""
    texts: list[str]
    truth: np.ndarray


def read_pairs(path: str | Path, clips: list[Path]) -> Pairs:
    """A CSV with header ``video,text``; ``video`` a path relative to the CSV's folder (or absolute)
    that must be one of ``clips``, so the file names no other file. One line naming file, line and field
    for anything else."""
    from svitt_ego.eval.embed import read_csv_rows

    path = Path(path)
    index = {clip.resolve(): i for i, clip in enumerate(clips)}
    texts: dict[str, int] = {}
    true: list[tuple[int, int]] = []
    for line, row in read_csv_rows(path, ("video", "text")):
        where = f"{path}, line {line}"
        text, video = row["text"].strip(), row["video"].strip()
        if not text:
            raise MetadataError(f"{where}, field 'text': empty")
        clip = index.get((path.parent / video).resolve()) if video else None
        if clip is None:
            raise MetadataError(f"{where}, field 'video': {shown(video)} is not one of the clips searched "
                                f"(a path relative to {path.parent} or absolute)")
        true.append((texts.setdefault(text, len(texts)), clip))
    if not true:
        raise MetadataError(f"{path}: holds no pairs")
    truth = np.zeros((len(texts), len(clips)), dtype=bool)
    for t, c in true:
        truth[t, c] = True
    return Pairs(list(texts), truth)


def recall_at(similarity: np.ndarray, truth: np.ndarray, ks=RECALL_AT) -> dict[str, dict[int, float]]:
    """Recall@K (%) of text -> video (rows of ``similarity[text, clip]``) and video -> text (columns).

    A query (a text, or a clip with at least one true text) is a hit at K when one of its true items
    is among its K best: fewer than K false items score at least as high as its best true one (ties
    count against it). Recall@K is the share of hits over the queries that have a true item."""
    def hits(scores: np.ndarray, true: np.ndarray) -> dict[int, float]:
        keep = true.any(axis=1)
        scores, true = scores[keep], true[keep]
        best = np.where(true, scores, -np.inf).max(axis=1, keepdims=True)
        above = (np.where(true, -np.inf, scores) >= best).sum(axis=1)
        return {k: float(100 * (above < k).mean()) for k in ks}

    return {"text -> video": hits(similarity, truth), "video -> text": hits(similarity.T, truth.T)}


def format_recall(recall: dict[str, dict[int, float]]) -> str:
    ks = next(iter(recall.values()))
    lines = [f"{'Recall (%)':16s}" + "".join(f"{'@' + str(k):>8s}" for k in ks)]
    return "\n".join(lines + [f"{name:16s}" + "".join(f"{v:>8.1f}" for v in row.values())
                              for name, row in recall.items()])


class WholeClipReader:
    """``num_frames`` uint8 frames ``[T, H, W, 3]`` of a clip file, the middle of each of ``num_frames``
    equal parts of its frames (LaViLa's rounding)."""

    def __init__(self, num_frames: int):
        self.num_frames = num_frames

    def __call__(self, path: Path) -> torch.Tensor:
        from svitt_ego.data.video import read_frames_by_index, video_header
        from svitt_ego.eval.embed import segment_frame_ids

        _, count = video_header(path)
        return read_frames_by_index(path, lambda fps: segment_frame_ids(0, count, self.num_frames))


def clip_length(path: Path) -> float:
    from svitt_ego.data.video import video_header

    fps, count = video_header(path)
    return count / float(fps)


def search_clips(checkpoint: str | Path, source: str | Path, queries: list[str], top_k: int = 5,
                 pairs: str | Path | None = None, how: Extraction = Extraction()
                 ) -> tuple[list[QueryResult], dict[str, str], dict | None]:
    """Text -> video retrieval over the clips of ``source``: per query (or, with ``pairs``, per text of
    that CSV) the ``top_k`` best clips, the unreadable clips ``{clip: why}`` (left out) and, with
    ``pairs``, :func:`recall_at` over the readable clips. ``how.frames`` re-inflates the model."""
    from svitt_ego.models.loading import load_for_eval
    from svitt_ego.eval.embed import embed_clips, embed_texts

    if bool(queries) == (pairs is not None):
        raise MetadataError("--mode clips takes QUERY ... or --pairs FILE.csv (whose texts are the queries), "
                            "not both" if queries else "give at least one QUERY, or --pairs FILE.csv")
    clips = list(list_videos([source]).values())
    truth = read_pairs(pairs, clips) if pairs is not None else None
    texts = truth.texts if truth is not None else list(queries)
    overrides = [f"model.vision.num_frames={how.frames}"] if how.frames else []
    model, cfg = load_for_eval(checkpoint, overrides=[*overrides, "data.num_workers=0"])
    device = torch.device(how.device)
    model = model.to(device)
    videos, skipped = embed_clips(model, clips, WholeClipReader(model.config.vision.num_frames), cfg, device,
                                  how.batch_size, "skip", "clips")
    readable = [i for i in range(len(clips)) if i not in skipped]
    _refuse_unreadable(source, pairs, clips, skipped, truth.truth[:, readable] if truth is not None else None)
    similarity = (embed_texts(model, texts, cfg, device) @ videos[readable].T).double().numpy()
    lengths = {i: clip_length(clips[i]) for i in readable}
    results = [QueryResult(text, [Moment(str(clips[readable[c]]), 0.0, lengths[readable[c]], float(row[c]))
                                  for c in np.argsort(-row, kind="stable")[:top_k]])
               for text, row in zip(texts, similarity)]
    recall = recall_at(similarity, truth.truth[:, readable]) if truth is not None else None
    return results, {str(clips[i]): why for i, why in skipped.items()}, recall


def _refuse_unreadable(source, pairs, clips: list[Path], skipped: dict[int, str], truth: np.ndarray | None) -> None:
    """One line when no clip could be read, or (with ``pairs``) none of the clips the pairs name: no ranking
    and no Recall@K (0 / 0) exist then."""
    first = f"; the first unreadable: {next(iter(skipped.values()))}" if skipped else ""
    if len(skipped) == len(clips):
        raise MetadataError(f"{source}: none of its {len(clips)} clips could be read{first}")
    if truth is not None and not truth.any():
        raise MetadataError(f"{pairs}: none of the clips its pairs name could be read ({len(skipped)} unreadable), "
                            f"so Recall@K has no query{first}")


def format_clips(results: list[QueryResult]) -> str:
    lines = []
    for result in results:
        width = _name_width(result)
        lines += [f"query: {printable(result.query)}", f"{'rank':>4s}  {'clip':{width}s}{'length':>9s}{'score':>8s}"]
        lines += [f"{rank:>4d}  {_name(m):{width}s}{m.end:>9.2f}{m.score:>8.3f}"
                  for rank, m in enumerate(result.moments, start=1)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def run_search(checkpoint: str | Path, source: str | Path, queries: list[str], mode: str = "moments",
               top_k: int = 5, cache: str | Path | None = None, how: Extraction = Extraction(),
               pairs: str | Path | None = None, html: str | Path | None = None, png: str | Path | None = None) -> int:
    """``svitt-ego search``: print the results (and Recall@K), write the page / contact sheet;
    returns the exit status (1 when a video could not be read)."""
    from svitt_ego.search_page import write_contact_sheet, write_page

    if mode not in MODES:
        raise MetadataError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if pairs is not None and mode != "clips":
        raise MetadataError("--pairs takes --mode clips")
    if html is not None or png is not None:
        for output in (html, png):
            refuse_input_as_output(output, searched_videos(source))
    if mode == "moments":
        results, failed = search_videos(checkpoint, source, queries, top_k, cache, how)
        print(format_moments(results))
    else:
        results, failed, recall = search_clips(checkpoint, source, queries, top_k, pairs, how)
        print(format_clips(results) if pairs is None else format_recall(recall))
        print(f"{len(results)} texts; {len(failed)} unreadable clips left out"
              + "".join(f"\n  {printable(why)}" for why in failed.values()))
    if html is not None or png is not None:
        add_frames(results, how.chunk_seconds)
    if html is not None:
        print(f"wrote {write_page(results, html)}")
    if png is not None:
        print(f"wrote {write_contact_sheet(results, png)}")
    return 1 if failed else 0
