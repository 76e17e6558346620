"""Load and validate the workflow configuration against its JSON schema.

Defaults from the schema are filled in, and unknown keys are refused with their path named, so a
typo (`lora: {rank: 8}`) fails at start-up instead of silently training with the default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from playpen_attribution.ensemble import checkpoints_after_training, last_epoch, scored_epochs
from playpen_attribution.methods import damping_sweep_methods, has_preconditioner, parse_method

# shipped inside the package, so an installed package validates configs wherever it runs
SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration does not match the schema."""


def _validator_with_defaults():
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        return f"at {where}: unknown key(s) {unknown}; allowed keys are {allowed}"
    if error.validator in ("oneOf", "anyOf") and error.context:
        reasons = sorted({e.message for e in error.context})
        return f"at {where}: {error.message}; alternatives failed because: " + "; ".join(reasons)
    return f"at {where}: {error.message}"


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate `config` in place (defaults filled in) and return it; raise ConfigError naming the key."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = _validator_with_defaults()(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors[:10])
        raise ConfigError(f"{source} is not a valid playpen-attribution config:\n  {lines}\n"
                          f"See config/README.md for every key and its default.")
    for name, run in config["runs"].items():
        _check_run(name, run, source)
    return config


def _check_run(name: str, run: dict[str, Any], source: str) -> None:
    """What the schema cannot say: keys that must agree with each other."""
    shards, max_train = run["attribution"]["shards"], run["data"]["max_rows"]["train"]
    if max_train is not None and shards > max_train:
        raise ConfigError(f"{source}: at runs.{name}.attribution.shards: {shards} shards for at most {max_train} "
                          f"training rows (runs.{name}.data.max_rows.train); every shard needs a row: set shards to "
                          f"at most {max_train}")
    scoring = run["attribution"]["scoring_training"]
    same = [key for key, value in scoring.items() if run["training"][key] == value]
    if same:
        verb = "equals" if len(same) == 1 else "equal"
        raise ConfigError(f"{source}: at runs.{name}.attribution.scoring_training: {same} {verb} runs.{name}.training's: "
                          f"the scored adapter would be trained twice alike; leave out the keys that do not differ "
                          f"(scoring_training: {{}} scores the run's own adapter)")
    checkpoints, epochs = run["attribution"]["checkpoints"], scored_epochs(run)
    if checkpoints_after_training(checkpoints, epochs):
        whose = "attribution.scoring_training" if "epochs" in scoring else "training"
        raise ConfigError(f"{source}: at runs.{name}.attribution.checkpoints: {checkpoints} lists an epoch after the "
                          f"scored adapters' last ({last_epoch(epochs)}, runs.{name}.{whose}.epochs {epochs}); list "
                          f"epochs 1 to {last_epoch(epochs)}")
    tokenization = run["tokenization"]
    if tokenization["loss_on"] == "assistant_turns" and tokenization["render"] != "chat":
        raise ConfigError(f"{source}: at runs.{name}.tokenization.loss_on: assistant_turns needs render: chat (a "
                          f"plain prompt/completion has no turns); set tokenization.render: chat or loss_on: last_turn")
    validation = run["validation"]
    for method in damping_sweep_methods(run):
        where = f"{source}: at runs.{name}.validation.damping.methods: {method}"
        if method not in run["attribution"]["methods"]:
            raise ConfigError(f"{where} is not one of the run's methods ({run['attribution']['methods']}); sweep "
                              "only methods the run scores")
        if not has_preconditioner(method):
            raise ConfigError(f"{where} has no preconditioner, so damping does not change it; leave it out")
        if parse_method(method).is_trak:
            raise ConfigError(f"{where}: TRAK inverts its Gram inside its own job, which the sweep does not rerun; "
                              "leave it out and set attribution.bergson.damping_factor instead")
    if damping_sweep_methods(run) and not (validation["lds"]["subsets"] or validation["planted"]["queries"]):
        raise ConfigError(f"{source}: at runs.{name}.validation.damping: a sweep needs something to measure: set "
                          f"validation.lds.subsets or validation.planted.queries above 0")


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Read one or more YAML files (later ones override earlier ones key by key) and validate."""
    merged: dict[str, Any] = {}
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        deep_update(merged, data)
    return validate_config(merged, source=", ".join(str(p) for p in paths))


def deep_update(target: dict, overlay: dict) -> dict:
    """Merge `overlay` into `target` recursively, as Snakemake merges `--configfile` overlays."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def run_config(config: dict[str, Any], run: str) -> dict[str, Any]:
    """The validated section of one named run, with a clear error for an unknown run name."""
    runs = config["runs"]
    if run not in runs:
        raise ConfigError(f"unknown run {run!r}; runs defined in the config: {sorted(runs)}")
    return runs[run]
