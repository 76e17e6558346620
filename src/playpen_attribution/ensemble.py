"""An ensemble of adapters (`attribution.ensemble`: K adapters trained on every training row; member 0 is the run's
adapter, member k >= 1 trains with seed training.seed + 1000 k). TRAK averages over it inside Bergson's own
pipeline (`bergson_attribution.trak_stage`); every other method scores each member with the member's own factors
(Kronfluence) or gradients and preconditioners (Bergson), and its score shards are the members' mean (Park et al.
2023 average over independently trained models for the same reason: one training run's scores carry its seed's
noise).

Checkpoints (`attribution.checkpoints`: epochs of each member's training, e.g. [1, 2]) multiply the members: every
method scores each member's adapter as it was after each listed epoch and averages over them, as TracIn sums over a
run's checkpoints (Pruthi et al. 2020) and TRAK ensembles over checkpoints of one run (Park et al. 2023); on smol it
gains +0.02 to +0.04 LDS, not resolved (docs/quality.md). A member's last epoch is its adapter; an earlier epoch's is
`<member folder>checkpoint-<epoch>/`.

A scoring schedule (`attribution.scoring_training`: training keys, e.g. {epochs: 1}) trains the adapters the methods
score by a schedule of their own (a proxy model), in `results/<run>/scoring/` (`scoring/adapter`,
`scoring/ensemble/member-k/adapter`), while the run's adapter, the queries' losses and the retrains the LDS and the
removal check compare with keep `training`. On smol, a one-epoch adapter's scores predicted the two-epoch retrains
better than the two-epoch adapter's own (docs/quality.md).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from playpen_attribution.tables import save_shard, save_sweep

MEMBER_FOLDER = "ensemble/member-{member}"  # under results/<run>/: member k >= 1 (member 0 is the run's own folders)
# The scoring rules' wildcard `member_dir`: "" (the run's own adapter) or a member's folder with its slash, so one rule
# scores every member; "scoring/" before it where attribution.scoring_training trains the scored adapters, an earlier
# epoch's "checkpoint-e/" after it.
MEMBER_FOLDER_PATTERN = r"(ensemble/member-[1-9]\d*/)?"  # "" or member k's folder with its slash (`member_of`)
MEMBER_DIR_PATTERN = rf"(scoring/)?{MEMBER_FOLDER_PATTERN}(checkpoint-[1-9]\d*/)?"
# a member's own folder: where its training writes the adapter
ENSEMBLE_DIR_PATTERN = rf"(scoring/)?{MEMBER_FOLDER_PATTERN}"
CHECKPOINT_FOLDER = "checkpoint-{epoch}"
SCORING_FOLDER = "scoring"  # under results/<run>/: the scored adapters where attribution.scoring_training is set


# Members' seeds stay clear of the seeds the LDS and removal retrains use (training.seed + repeat): a member that
# shared its LoRA initialisation and dropout stream with the retrains it is measured against would correlate its
# scores' seed noise with theirs and flatter the ensemble.
MEMBER_SEED_STRIDE = 1000


def member_of(member_folder: str) -> int:
    """The member a MEMBER_FOLDER_PATTERN folder belongs to: 0 for "" (the run's own), k for "ensemble/member-k/"."""
    return int(re.fullmatch(r"(?:ensemble/member-(\d+)/)?", member_folder).group(1) or 0)


def member_seed(training_seed: int, member: int) -> int:
    return training_seed + MEMBER_SEED_STRIDE * member


def last_epoch(epochs: float) -> int:
    """The epoch a training of `training.epochs` ends in (a fraction of an epoch counts as one)."""
    return math.ceil(epochs)


def checkpoints_after_training(checkpoints, epochs: float) -> list[int]:
    """The listed checkpoint epochs that come after the training's last: none in a valid config."""
    return [e for e in checkpoints if e > last_epoch(epochs)]


def scored_dirs(members: int, checkpoints=(), epochs: float = 1, scoring: bool = False) -> list[str]:
    """The folders under results/<run>/ of every adapter the methods score, the run's own first: "" for the run's
    adapter, "ensemble/member-k/" for member k's, and "checkpoint-e/" inside either for its adapter after epoch e
    (`checkpoints`; empty: the trained adapters only), each under "scoring/" where the scored adapters have a
    schedule of their own (`scoring`; `epochs` is then that schedule's). A listed last epoch is the trained adapter
    itself."""
    final = last_epoch(epochs)
    beyond = checkpoints_after_training(checkpoints, epochs)
    if beyond:
        raise ValueError(f"attribution.checkpoints {list(checkpoints)}: epoch(s) {beyond} after the scored adapters' "
                         f"last (epochs {epochs}); list epochs 1 to {final}")
    epochs_scored = sorted(set(checkpoints), key=lambda e: (e != final, e)) or [final]
    scoring_dir = f"{SCORING_FOLDER}/" if scoring else ""
    owns = [scoring_dir] + [f"{scoring_dir}{MEMBER_FOLDER.format(member=k)}/" for k in range(1, members)]
    return [own if e == final else f"{own}{CHECKPOINT_FOLDER.format(epoch=e)}/" for own in owns for e in epochs_scored]


def adapters_line(members: int, training_seed: int, checkpoints=(), epochs: float = 1, scoring_training=None) -> str:
    """The report's line saying which adapters the scores come from (`scoring_training`: the overrides of
    attribution.scoring_training, whose epochs `epochs` then are)."""
    final = last_epoch(epochs)
    after = sorted(set(checkpoints)) or [final]
    when = "" if after == [final] else f" after epoch{'s' if len(after) > 1 else ''} {', '.join(map(str, after))}"
    count = members * len(after)
    schedule = (", trained for scoring with " + ", ".join(f"{key} {value}" for key, value in scoring_training.items())
                if scoring_training else "")
    if count <= 1:
        own = "an adapter of the run's data" if scoring_training else "the run's adapter"
        return f"{own}{when} (training seed {training_seed}{schedule})"
    seeds = ", ".join(str(member_seed(training_seed, k)) for k in range(members))
    return (f"every method and the damping sweep: the mean over {count} adapters (training seed"
            f"{'s' if members > 1 else ''} {seeds}{when}{schedule})")


def scored_training(run: dict) -> dict:
    """The training section the scored adapters are trained with: the run's `training` with
    attribution.scoring_training's keys in place of its own."""
    return {**run["training"], **run["attribution"]["scoring_training"]}


def scoring_overrides(run: dict, member: int) -> dict:
    """What member `member`'s scored adapter trains with in place of the run's `training` keys, where
    attribution.scoring_training is set: that schedule's keys and the member's seed (the run's own for member 0)."""
    return {**run["attribution"]["scoring_training"], "seed": member_seed(run["training"]["seed"], member)}


def scored_epochs(run: dict) -> float:
    """training.epochs of the scored adapters (attribution.scoring_training's where it sets them)."""
    return run["attribution"]["scoring_training"].get("epochs", run["training"]["epochs"])


def run_scored_dirs(run: dict) -> list[str]:
    """`scored_dirs` of a validated run config."""
    attribution = run["attribution"]
    return scored_dirs(attribution["ensemble"], attribution["checkpoints"], scored_epochs(run),
                       scoring=bool(attribution["scoring_training"]))


def member_paths(run_name: str, path: str, run: dict) -> list[str]:
    """`results/<run>/<member folder><path>` of every scored adapter (`run_scored_dirs`), the run's own first."""
    return [f"results/{run_name}/{folder}{path}" for folder in run_scored_dirs(run)]


def mean_of_member_shards(member_paths: list, out_path) -> None:
    """Rule `ensemble_mean_scores`: one score shard whose scores (and per-token scores, and reduced scores) are the
    mean of the members' shards, which must hold the same queries and training rows in the same order. A damping
    sweep's files (`tables.save_sweep`: scores per damping factor) are averaged the same way, factor by factor."""
    members = [np.load(p, allow_pickle=False) for p in member_paths]  # lazy: an array is read when asked for
    first = members[0]
    sweep = "damping" in first.files
    agreed = ("query_ids", "row_ids", "damping") if sweep else ("query_ids", "train_ids")
    for path, member in zip(member_paths, members):
        for ids in agreed:
            if not np.array_equal(member[ids], first[ids]):
                what = "damping factors" if ids == "damping" else f"{ids.removesuffix('_ids')} rows"
                raise ValueError(f"{path} holds other {what} than {member_paths[0]}: the members were scored on "
                                 f"different data or settings; rerun its scoring (snakemake {Path(path)} --force)")

    def mean(key, dtype):
        """Summed one member at a time: the job holds the sum and one member's array (a shard's per-token scores
        can be GBs; they are summed in float32, as they are stored)."""
        if not all(key in m.files for m in members):
            return None
        total = members[0][key].astype(dtype)
        for member in members[1:]:
            total += member[key]
        total /= len(members)  # in place: no third array
        return total

    if sweep:
        save_sweep(out_path, mean("scores", np.float64), first["damping"].tolist(), list(first["query_ids"]),
                   list(first["row_ids"]))
        return
    save_shard(out_path, mean("scores", np.float64), list(first["query_ids"]), list(first["train_ids"]),
               per_token=mean("per_token", np.float32), reduced=mean("reduced", np.float64))
