"""The LDS's retrains: random subsets of the training rows, and one LoRA adapter per subset from the run's base
model and SFT settings. Its own module, so that the retrains (the audit's costly part) rerun when their code
changes and not when the audit's statistics do (validation)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from playpen_attribution.io import atomic_path, write_json_atomic
from playpen_attribution.settings import LdsSubsets, Lora, Training

log = logging.getLogger(__name__)


def lds_subset_rows(train_ids: list[str], subset: int, fraction: float, seed: int) -> list[str]:
    """The training rows of one LDS subset: drawn from (seed, subset) alone, so adding subsets never changes
    the earlier ones."""
    size = max(1, round(fraction * len(train_ids)))
    picked = np.random.default_rng([seed, subset]).choice(len(train_ids), size=size, replace=False)
    return [train_ids[i] for i in sorted(picked)]


def lds_batches(subsets: int, per_job: int) -> list[list[int]]:
    """Subset indices by retraining job: [0..k), [k..2k), ...; a new subset only ever extends the last job."""
    return [list(range(start, min(start + per_job, subsets))) for start in range(0, subsets, per_job)]


def repeat_training(training: Training, repeat: int) -> Training:
    """The SFT settings of repeat `repeat` of a retrain: the run's training seed + `repeat` (repeat 0 trains with the
    run's own seed), so that averaging the repeats averages out what the seed alone decides."""
    return dataclasses.replace(training, seed=training.seed + repeat)


def lds_retrain_stage(base_model_dir, train_tokens_dir, out_dir, *, subsets: list[int], settings: LdsSubsets,
                      lora: Lora, training: Training, max_length: int, dtype: str, base_model_source=None,
                      repeat: int = 0) -> None:
    """Rule `lds_retrain`: one LoRA adapter per subset, from the same base with the run's SFT settings and the
    training seed of repeat `repeat` (`repeat_training`), in one process (a cluster runs one job per subset; the
    demo groups them so it pays the imports once)."""
    import datasets

    from playpen_attribution.training import train_adapter

    train = datasets.load_from_disk(str(train_tokens_dir))
    ids = list(train["row_id"])
    index = {row_id: i for i, row_id in enumerate(ids)}
    fraction, seed = settings.fraction, settings.seed
    training = repeat_training(training, repeat)
    with atomic_path(out_dir, directory=True) as tmp:
        record = {"fraction": fraction, "seed": seed, "repeat": repeat, "training_seed": training.seed, "subsets": {}}
        for subset in subsets:
            rows = lds_subset_rows(ids, subset, fraction, seed)
            tokens = Path(tmp) / f".tokens-{subset}"
            train.select([index[r] for r in rows]).save_to_disk(str(tokens))
            train_adapter(base_model_dir, tokens, Path(tmp) / f"subset-{subset}", lora=lora, training=training,
                          max_length=max_length, dtype=dtype, base_model_source=base_model_source)
            shutil.rmtree(tokens)
            record["subsets"][str(subset)] = rows
            log.info("subset %d, repeat %d (training seed %d): adapter trained on %d of %d rows", subset, repeat,
                     training.seed, len(rows), len(ids))
        write_json_atomic(record, Path(tmp) / "subsets.json")
