"""LoRA supervised fine-tuning with TRL's SFTTrainer on the one tokenization.

TRL receives the already tokenized `input_ids`/`labels` (it uses a `labels` column as is), so the adapter
is trained on exactly the tokens that Bergson and Kronfluence later differentiate. A test checks that
these equal what SFTTrainer would produce itself from the same conversational rows.

The adapter folder is self-contained: adapter weights, tokenizer, the base model's `config.json` (Bergson
reads it to infer the maximum length; PEFT does not write one) and `manifest.json` (base model id and
revision, the row ids trained on, seed, hyperparameters, library versions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

from playpen_attribution.devices import check_triton_toolchain, single_device_check
from playpen_attribution.ensemble import last_epoch
from playpen_attribution.io import atomic_path, write_json_atomic
from playpen_attribution.modeling import load_causal_lm, load_tokenizer, portable_base_path, torch_dtype
from playpen_attribution.provenance import library_versions, tree_hash
from playpen_attribution.settings import Lora, Training, as_params
from playpen_attribution.stage import log_gradient_pass, log_time, token_count
from playpen_attribution.tokenization import read_tokens_report

log = logging.getLogger(__name__)


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str):
    """`auto` = bf16 where the hardware has it, else fp32 (TRL's bf16 default raises on a CPU box)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    if name == "bfloat16" and not bf16_supported() and not _cpu_bf16_ok():
        raise RuntimeError("model.dtype is bfloat16 but this machine has no bf16 support; use auto or float32")
    return torch_dtype(name)


def _cpu_bf16_ok() -> bool:
    import torch

    return not torch.cuda.is_available()  # bf16 runs (slowly) on CPUs through PyTorch's reference kernels


def without_timings(entry: dict) -> dict:
    """A trainer metrics entry without its wall-clock values (`*_runtime`, `*_per_second`): they go to the log, so
    the adapter's manifest is the same bytes for the same inputs."""
    return {k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))}


OPTIMIZER_FILE = "optimizer.pt"
# Inside an adapter folder trained with keep_epochs: `epoch-<e>/`, a complete adapter folder of the weights (and Adam
# second moments) after each epoch before the last; rule checkpoint_adapter copies one out for the scoring rules.
CHECKPOINTS_FOLDER = "checkpoints"


def kept_epoch_dir(adapter_dir: str | Path, epoch: int) -> Path:
    """Where an adapter folder keeps its adapter after `epoch`."""
    return Path(adapter_dir) / CHECKPOINTS_FOLDER / f"epoch-{epoch}"


def second_moments(optimizer, model) -> dict:
    """The optimizer's state as gradient normalisation reads it (Bergson's `load_from_optimizer`): each LoRA
    parameter's `exp_avg_sq` and step, with its name as PEFT saves it (`param_name`, e.g.
    `base_model.model.model.layers.0.mlp.up_proj.lora_A.weight`), in one param group. The trainer's own layout (a
    weight-decay and a no-decay group) is what Bergson 2.5.1 cannot map back to a PEFT model's parameters
    ("Cannot map optimizer.pt state indices to params"); the names make the mapping explicit. Half the size of the
    full state (no first moments)."""
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter if isinstance(adapter, str) else adapter[0]
    names = {id(p): n.replace(f".{adapter}.", ".") for n, p in model.named_parameters()}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    full = optimizer.state_dict()
    state = {}
    for index, param in enumerate(ordered):
        entry = full["state"].get(index)
        if entry is None or "exp_avg_sq" not in entry:
            continue
        state[index] = {"exp_avg_sq": entry["exp_avg_sq"], "step": entry.get("step"), "param_name": names[id(param)]}
    return {"state": state, "param_groups": [{"params": list(range(len(ordered)))}]}


@contextlib.contextmanager
def label_positions_only_lm_head():
    """TRL's fused LM head (SFTTrainer's loss) projects only the positions that have a label on CUDA and XPU, and
    every position elsewhere, to keep tile shapes fixed on compiled backends (Neuron). A CPU compiles nothing, and a
    completion-only loss labels a few tokens of each row (taboo: 7 of 180), so there the full projection was a third
    of a training job or more (bench/training_step.py) and changed nothing: bit-identical weights (a test checks).
    Inside this block TRL's fused head takes its label-positions path on CPUs too; the kernels stay TRL's own
    (`trl.kernels.chunked_logprob` keeps its own check and runs its torch tiles on a CPU)."""
    from trl.trainer import utils as trl_utils

    on_triton = getattr(trl_utils, "_use_triton", None)
    if on_triton is None:  # a TRL without the fused head's switch: its own behaviour, unchanged
        yield
        return
    trl_utils._use_triton = lambda device: on_triton(device) or device.type == "cpu"
    try:
        yield
    finally:
        trl_utils._use_triton = on_triton


def train_adapter(
    base_model_dir: str | Path,
    train_tokens_dir: str | Path,
    output_dir: str | Path,
    *,
    lora: Lora,
    training: Training,
    max_length: int,
    dtype: str = "auto",
    base_model_source: dict | None = None,
    eval_tokens_dir: str | Path | None = None,
    save_optimizer_state: bool = False,
    keep_epochs: bool = False,
):
    """Train a LoRA adapter and write it atomically to `output_dir`; return the trained PEFT model.

    `eval_tokens_dir`: rows to compute the eval loss on after every epoch (the manifest's `eval.losses`); no
    checkpoint is chosen by it and the row order stays. With LoRA dropout it does move the weights' random draw: each
    eval's DataLoader takes its base seed from torch's global generator, as the dropout masks of the later epochs do,
    so an adapter trained with eval rows is another draw than one trained without (the removal check's no-removal
    reference is a retrain of its own, not the run's adapter). `save_optimizer_state`: also write the optimizer's
    final second moments (`optimizer.pt`, Adam's `exp_avg_sq` per LoRA parameter in the trainer's param-group
    layout), which TrackStar normalises gradients by. `keep_epochs`: also keep the adapter as it was after each epoch
    before the last (`checkpoints/epoch-<e>/`, complete adapter folders, with their second moments where
    `save_optimizer_state`), which attribution.checkpoints scores."""
    import shutil

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    base_model_dir = Path(base_model_dir).resolve()
    seed = training.seed
    set_seed(seed)
    if torch.cuda.is_available():
        check_triton_toolchain()  # before the model loads: TRL's loss compiles Triton kernels on the first step
    dtype_of_model = resolve_dtype(dtype)
    use_bf16 = dtype_of_model == torch.bfloat16
    tokenizer = load_tokenizer(base_model_dir)
    model = load_causal_lm(base_model_dir, dtype=dtype_of_model)
    tokens = datasets.load_from_disk(str(train_tokens_dir))
    train_dataset = tokens.select_columns(["input_ids", "labels"])
    eval_tokens = datasets.load_from_disk(str(eval_tokens_dir)) if eval_tokens_dir else None

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    output_dir = Path(output_dir)
    # the trainer's own folder (checkpoints are off): a hidden sibling, removed once the adapter is written
    scratch = output_dir.parent / f".{output_dir.name}.trainer"
    args = SFTConfig(
        output_dir=str(scratch),
        num_train_epochs=training.epochs,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation,
        warmup_steps=float(training.warmup_ratio),  # transformers 5: a float in [0, 1) is a ratio
        weight_decay=training.weight_decay,
        lr_scheduler_type=training.lr_scheduler,
        logging_steps=training.logging_steps,
        seed=seed,
        data_seed=seed,
        bf16=use_bf16,
        # bf16 on a CPU (reference kernels, slow but exact enough for a test) needs the Trainer told it is on one
        use_cpu=use_bf16 and not torch.cuda.is_available(),
        max_length=max_length,
        completion_only_loss=True,
        activation_checkpointing=False,
        save_strategy="no",
        eval_strategy="epoch" if eval_tokens is not None else "no",
        per_device_eval_batch_size=training.batch_size,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    single_device_check(args.n_gpu)
    final_epoch = last_epoch(training.epochs)
    # relative to the adapter folder inside one project (a moved project still loads), else absolute
    base_path = portable_base_path(base_model_dir, output_dir)

    def write_adapter_files(peft_model, optimizer, dest: Path, base: str):
        """Everything of an adapter folder but its manifest: the weights, the tokenizer, the base's config."""
        peft_model.save_pretrained(str(dest))
        config_path = dest / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = base
        # PEFT writes its target-module set in the process's hash order: sorted, the file is the same every run
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(dest))
        # PEFT writes no config.json; Bergson calls AutoConfig on the adapter folder (the playpen guide's workaround).
        peft_model.get_base_model().config.save_pretrained(str(dest))
        if save_optimizer_state:
            torch.save(second_moments(optimizer, peft_model), dest / OPTIMIZER_FILE)

    kept = {}  # epoch -> (its adapter folder in the trainer's scratch folder, its base path)

    class KeepEpochAdapters(TrainerCallback):
        """Writes the adapter after each epoch but the last (which is the adapter itself)."""

        def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            # the epoch that just ended: state.epoch is a float, 1.0 (or a hair off) after the first, 2.5 after a
            # last half epoch (which ends epoch 3, the adapter itself)
            epoch = math.ceil(state.epoch - 1e-3)
            if epoch < final_epoch:
                # the base path as seen from the folder the checkpoint ends up in, inside the adapter
                kept[epoch] = (scratch / f"epoch-{epoch}",
                               portable_base_path(base_model_dir, kept_epoch_dir(output_dir, epoch)))
                write_adapter_files(model, optimizer, *kept[epoch])

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_tokens.select_columns(["input_ids", "labels"]) if eval_tokens is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[KeepEpochAdapters()] if keep_epochs else None,
    )
    # TRL drops rows that truncation leaves without a trainable token; record what it really trained on.
    if len(trainer.train_dataset) != len(tokens):
        raise RuntimeError(f"SFTTrainer kept {len(trainer.train_dataset)} of {len(tokens)} tokenized rows; "
                           "the tokenization should have made every row fit")
    with label_positions_only_lm_head():
        result = trainer.train()
    log_time(f"training {output_dir.name}", result.metrics["train_runtime"])
    tokens_per_epoch = token_count(tokens)
    for epoch in range(final_epoch):  # one forward+backward pass over the rows per epoch
        log_gradient_pass(train_tokens_dir, len(tokens), tokens_per_epoch, f"training epoch {epoch + 1}")
    metrics = without_timings(result.metrics)
    model = trainer.model
    model.eval()

    tokens_report = read_tokens_report(train_tokens_dir)
    eval_losses = [{"epoch": e["epoch"], "eval_loss": e["eval_loss"]}
                   for e in trainer.state.log_history if "eval_loss" in e]
    manifest = {
        "base_model": {**(base_model_source or {}), "path": base_path},
        "trained_row_ids": list(tokens["row_id"]),
        "n_trained_rows": len(tokens),
        "train_tokens_hash": tree_hash(train_tokens_dir),
        "seed": seed,
        "dtype": str(dtype_of_model).removeprefix("torch."),
        "lora": as_params(lora),
        "training": as_params(training),
        "max_length": max_length,
        # how prompt and completion became tokens (chat template or plain), for tools that tokenize new rows
        "render": tokens_report.get("render"),
        # which tokens carried the loss: the last assistant turn or every one (tokenization.loss_on)
        "loss_on": tokens_report.get("loss_on", "last_turn"),
        "metrics": metrics,
        # mean token cross-entropy per epoch, on the rows named here (none: training.evaluate is off)
        "eval": {"rows": len(eval_tokens) if eval_tokens is not None else 0,
                 "row_ids": list(eval_tokens["row_id"]) if eval_tokens is not None else [],
                 "losses": eval_losses},
        "log_history": [without_timings(entry) for entry in trainer.state.log_history],
        "versions": library_versions(),
    }
    with atomic_path(output_dir, directory=True) as tmp:
        write_adapter_files(model, trainer.optimizer, Path(tmp), base_path)
        write_json_atomic(manifest, Path(tmp) / "manifest.json")
        for epoch, (folder, epoch_base_path) in sorted(kept.items()):
            # the run's manifest as of that epoch: what it trained on and how, the eval losses it had seen
            seen = [loss for loss in eval_losses if loss["epoch"] <= epoch + 1e-6]
            at_epoch = {**manifest, "checkpoint": {"epoch": epoch, "of": final_epoch},
                        "base_model": {**manifest["base_model"], "path": epoch_base_path},
                        "eval": {**manifest["eval"], "losses": seen}, "metrics": None,
                        "log_history": [e for e in manifest["log_history"] if e.get("epoch", 0) <= epoch + 1e-6]}
            write_json_atomic(at_epoch, folder / "manifest.json")
            kept_epoch_dir(tmp, epoch).parent.mkdir(exist_ok=True)
            shutil.move(str(folder), kept_epoch_dir(tmp, epoch))
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("adapter written to %s; metrics %s", output_dir, metrics)
    return model


def checkpoint_adapter(adapter_dir: str | Path, epoch: int, output_dir: str | Path) -> None:
    """Rule `checkpoint_adapter`: the adapter kept after `epoch` (train_adapter's keep_epochs) as an adapter folder of
    its own, for the scoring rules (a folder inside another rule's folder cannot be an input). Its base path is
    rewritten for where it now lies."""
    import shutil

    from playpen_attribution.modeling import adapter_base_path

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    source = kept_epoch_dir(adapter_dir, epoch)
    if not (source / "manifest.json").is_file():
        kept = sorted(p.name for p in (adapter_dir / CHECKPOINTS_FOLDER).glob("epoch-*"))
        raise FileNotFoundError(
            f"{adapter_dir} keeps no adapter of epoch {epoch} (it keeps {', '.join(kept) or 'none'}): it was trained "
            f"before adapters were kept per epoch, or for fewer epochs. Retrain it (snakemake {adapter_dir} --force), "
            "or leave the epoch out of attribution.checkpoints")
    base = adapter_base_path(source)
    with atomic_path(output_dir, directory=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        config_path = Path(tmp) / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = portable_base_path(base, output_dir)
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
        manifest["base_model"]["path"] = adapter_config["base_model_name_or_path"]
        write_json_atomic(manifest, Path(tmp) / "manifest.json")
