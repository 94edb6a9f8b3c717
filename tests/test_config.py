"""pipeline/config.py: the default config, unknown keys, wrong types, ranges, and ``--set`` overrides."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    DataConfig,
    PipelineConfig,
    ResourcesConfig,
    TeacherConfig,
    TrackingConfig,
    apply_override,
    dump_config,
    load_config,
)
from stages.core.errors import ConfigError
from stages.models.factory import ModelSpec
from stages.pretrain import PretrainConfig
from stages.pseudo_label import PseudoLabelConfig
from stages.train import TrainConfig
from tests.conftest import tiny_tree

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


@pytest.fixture
def tree(tmp_path) -> dict:
    """A valid config tree (load_config does not open shards) with a two-rung ladder."""
    base = tiny_tree(Path("/data/digits"), tmp_path / "runs")
    base["ladder"] = [base["ladder"][0], {**base["ladder"][0], "model": "test_resnet", "drop_rate": 0.3}]
    return base


def _refused(tree: dict, *overrides: str) -> str:
    """The ConfigError message for ``overrides`` on ``tree``; it must be one line (the CLI prints it as is)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides), base=tree)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- the default config


def test_the_default_config_loads_and_documents_every_key():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.rounds == 3 and cfg.name == "digits"
    assert cfg.data.labeled == ("data/digits/labeled/labeled-{000000..000003}.tar",)
    assert (cfg.data.num_classes, cfg.data.channels) == (10, 1) and cfg.data.image_size >= 8
    assert [s.model for s in cfg.ladder] == ["resnet10t", "resnet10t"]
    assert cfg.ladder[1].drop_rate == 0.3 and cfg.spec(5) == cfg.ladder[1]
    assert cfg.teacher.epochs == 60 and cfg.student.unlabeled_ratio == 3.0
    assert len(cfg.teacher.randaug_ops) == 9
    assert (cfg.select.mode, cfg.select.align, cfg.pretrain.init_students) == ("auto", "auto", "auto")
    assert cfg.select.resolve(False).mode == "balanced"  # the paper's for a teacher that did not need pretraining
    # "Every key is listed": each section names every field of its dataclass (teacher + student for TrainConfig)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    sections = {
        "data": DataConfig,
        "pseudo_label": PseudoLabelConfig,
        "select": type(cfg.select),
        "resources": ResourcesConfig,
        "tracking": TrackingConfig,
        "pretrain": PretrainConfig,
    }
    for name, cls in sections.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert set(raw["teacher"]) | set(raw["student"]) == {f.name for f in dataclasses.fields(TeacherConfig)}
    assert set(raw["student"]) <= {f.name for f in dataclasses.fields(TrainConfig)}  # init, from_model: round 0 only
    assert set(raw) == {f.name for f in dataclasses.fields(PipelineConfig)}


def test_a_config_file_loads_with_overrides_on_top(tree, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path, ["student.epochs=4"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.student.epochs == 4 and cfg.teacher.epochs == tree["teacher"]["epochs"]
    assert cfg.data.labeled == tuple(tree["data"]["labeled"])
    assert cfg.ladder == (ModelSpec(**tree["ladder"][0]), ModelSpec(**tree["ladder"][1]))


def test_the_resolved_config_reloads_to_the_same_config(tree):
    cfg = load_config(None, [], base=tree)
    again = load_config(None, [], base=yaml.safe_load(dump_config(cfg)))
    assert again == cfg and again.digest() == cfg.digest()
    assert load_config(None, ["student.epochs=9"], base=tree).digest() != cfg.digest()


@pytest.mark.parametrize(
    "content, expected",
    [(None, "not found"), ("- a\n- b\n", "top level must be a mapping"), ("rounds: [1\n", "not valid YAML")],
)
def test_a_bad_config_file_is_a_config_error(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\ndata:\n  labeled: [data/x-{0..3}.tar]\n")  # the mistake configs/digits.yaml had
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:3:20: not valid YAML: ")
    assert "quote" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("roundz=3", "config.roundz", "did you mean 'rounds'?"),
        ("student.epoch=5", "config.student.epoch", "did you mean 'epochs'?"),
        ("pseudo_label.temprature=2", "config.pseudo_label.temprature", "did you mean 'temperature'?"),
        ("ladder.0.drop_rat=0.1", "config.ladder[0].drop_rat", "did you mean 'drop_rate'?"),
        ("data.zzz=1", "config.data.zzz", "allowed: allow_test_overlap, augment, channels, classes, image_size"),
    ],
)
def test_an_unknown_key_is_named_with_a_suggestion(tree, override, key, hint):
    message = _refused(tree, override)
    assert message.startswith(f"{key}: unknown key")
    assert hint in message


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, where, wanted",
    [
        ("student.epochs=ten", "config.student.epochs", "expected int, got str 'ten'"),
        ("student.epochs=true", "config.student.epochs", "expected int, got bool"),
        ("rounds=2.5", "config.rounds", "expected int, got float"),
        ("student.lr=fast", "config.student.lr", "expected float, got str"),
        ("student.lr=false", "config.student.lr", "expected float, got bool"),
        ("resources.use_gpu=1", "config.resources.use_gpu", "expected bool, got int"),
        ("data.num_classes=[10]", "config.data.num_classes", "expected int, got list"),
        ("data.labeled={a: 1}", "config.data.labeled", "expected a list"),
        ("student=5", "config.student", "expected a mapping"),
        ("name=[a]", "config.name", "expected str, got list"),
    ],
)
def test_a_wrong_type_is_named(tree, override, where, wanted):
    message = _refused(tree, override)
    assert message.startswith(f"{where}: ")
    assert wanted in message


def test_an_int_is_accepted_where_a_float_is_expected(tree):
    cfg = load_config(None, ["student.lr=1", "ladder.0.randaug_m=9", "data.mean=[0]"], base=tree)
    assert cfg.student.lr == 1.0 and type(cfg.student.lr) is float
    assert cfg.ladder[0].randaug_m == 9.0 and type(cfg.ladder[0].randaug_m) is float
    assert cfg.data.mean == (0.0,) and type(cfg.data.mean[0]) is float


def test_a_single_value_is_accepted_where_a_list_is_expected(tree):
    cfg = load_config(None, ["data.test=/data/t-{0..3}.tar"], base=tree)
    assert cfg.data.test == ("/data/t-{0..3}.tar",)


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    "override, field",
    [
        ("ladder.0.drop_rate=-0.1", "config.ladder[0].drop_rate"),
        ("ladder.1.drop_path_rate=1.0", "config.ladder[1].drop_path_rate"),
        ("ladder.0.randaug_m=11", "config.ladder[0].randaug_m"),
        ("rounds=0", "config.rounds"),
        ("pseudo_label.temperature=0", "config.pseudo_label.temperature"),
        ("pseudo_label.topk=-1", "config.pseudo_label.topk"),
        ("student.optimizer=adam", "config.student.optimizer"),
        ("teacher.epochs=0", "config.teacher.epochs"),
        ("student.randaug_ops=[Rotate, Mirror]", "config.student.randaug_ops"),
        ("select.mode=bogus", "config.select.mode"),
        ("data.channels=2", "config.data.channels"),
        ("data.std=[0]", "config.data.std"),
        ("data.mean=[0.5, 0.5]", "config.data.mean"),
        ("resources.train_workers=0", "config.resources.train_workers"),
        ("resources.label_actors=-1", "config.resources.label_actors"),
        ("resources.label_threads=-2", "config.resources.label_threads"),
        ("student.unlabeled_ratio=0", "config.student.unlabeled_ratio"),
        ("student.unlabeled_ratio=0.01", "config.student.unlabeled_ratio"),
        ("ladder=[]", "config.ladder"),
    ],
)
def test_an_out_of_range_value_is_named(tree, override, field):
    assert _refused(tree, override).startswith(f"{field}: ")


def test_an_unknown_timm_model_in_the_ladder_is_refused(tree):
    message = _refused(tree, "ladder.1.model=resnet_does_not_exist")
    assert message.startswith("config.ladder[1].model: unknown timm model 'resnet_does_not_exist'")


# ---------------------------------------------------------------- overrides


def test_overrides_reach_nested_keys_lists_and_ladder_entries(tree):
    cfg = load_config(
        None,
        [
            "student.epochs=7",
            "ladder.0.model=resnet14t",
            "ladder.1.drop_rate=0.4",
            "student.randaug_ops=[Rotate, ShearX]",
            "data.labeled=['/a/x-{0..1}.tar', /b/*.tar]",  # a brace pattern must be quoted inside [...]
            "resources.use_gpu=true",
            "name=a=b",  # only the first '=' separates the key
        ],
        base=tree,
    )
    assert cfg.student.epochs == 7 and cfg.teacher.epochs == tree["teacher"]["epochs"]
    assert cfg.ladder[0].model == "resnet14t" and cfg.ladder[0].drop_rate == tree["ladder"][0]["drop_rate"]
    assert cfg.ladder[1].model == "test_resnet" and cfg.ladder[1].drop_rate == 0.4
    assert cfg.student.randaug_ops == ("Rotate", "ShearX")
    assert cfg.data.labeled == ("/a/x-{0..1}.tar", "/b/*.tar")
    assert cfg.resources.use_gpu is True
    assert cfg.name == "a=b"


def test_apply_override_edits_the_tree_in_place():
    tree = {"ladder": [{"model": "a"}, {"model": "b"}], "data": {"mean": [0.5]}}
    apply_override(tree, "ladder.1.model=c")
    apply_override(tree, "data.mean.0=0.25")
    apply_override(tree, "new.section.key= 5 ")
    apply_override(tree, "ladder.0={model: d, drop_rate: 0.1}")
    apply_override(tree, "name=")
    assert tree == {
        "ladder": [{"model": "d", "drop_rate": 0.1}, {"model": "c"}],
        "data": {"mean": [0.25]},
        "new": {"section": {"key": 5}},
        "name": "",
    }


@pytest.mark.parametrize("assignment", ["student.epochs", "rounds.x=1"])
def test_a_malformed_override_is_a_config_error(tree, assignment):
    message = _refused(tree, assignment)
    assert assignment.split("=")[0] in message


@pytest.mark.parametrize("assignment", ["ladder.5.model=resnet14t", "ladder.model=resnet14t"])
def test_an_override_into_a_list_that_does_not_fit_is_a_config_error(tree, assignment):
    message = _refused(tree, assignment)
    assert "ladder" in message


def test_overrides_do_not_edit_the_base_tree(tree):
    before = copy.deepcopy(tree)
    load_config(None, ["student.epochs=9", "ladder.1.drop_rate=0.2"], base=tree)
    assert tree == before


@pytest.mark.parametrize("assignment", ["data.labeled=[/a/x-{0..1}.tar]", "name=[a"])
def test_an_override_value_that_is_not_yaml_is_a_config_error(tree, assignment):
    message = _refused(tree, assignment)
    assert assignment.split("=")[0] in message


def _flat(tree: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def test_digits_hard_is_the_default_on_the_hard_split_with_pretraining():
    """configs/digits-hard.yaml differs from configs/digits.yaml in its name, data folder and split, and pretraining."""
    hard_path = DEFAULT_CONFIG.with_name("digits-hard.yaml")
    default, hard = _flat(yaml.safe_load(DEFAULT_CONFIG.read_text())), _flat(yaml.safe_load(hard_path.read_text()))
    differ = {k for k in default.keys() | hard.keys() if default.get(k) != hard.get(k)}
    paths = {"data.labeled", "data.unlabeled", "data.test", "data.val", "data.prepare_digits"}
    assert differ == paths | {"name", "data.prepare_labeled_per_class", "pretrain.enabled"}
    assert all("data/digits-hard" in str(hard[k]) and "data/digits/" not in str(hard[k]) for k in paths)
    cfg = load_config(hard_path)
    assert cfg.data.prepare_labeled_per_class == 2 and cfg.pretrain.enabled == "on"
    assert "bench/results/seeds-2026-12-03-104531.json" in hard_path.read_text()  # its figures, from the file


def test_the_digits_folder_must_hold_the_split_the_config_asks_for(digits_root, tmp_path):
    from pipeline.cli import ensure_digits

    ensure_digits(str(digits_root), 10)  # there already: nothing written
    with pytest.raises(ConfigError) as info:
        ensure_digits(str(digits_root), 2)
    assert str(info.value).startswith("data.prepare_digits: ") and "not 20 (2 per class)" in str(info.value)
    ensure_digits(str(tmp_path / "hard"), 2)
    assert len(list((tmp_path / "hard" / "labeled").glob("*.tar"))) == 4


# ---------------------------------------------------------------- pydantic underneath


def test_the_default_config_digest_is_unchanged():
    """The digest is part of a run's resume identity: a validation rewrite must not move it (golden value).
    Moved on purpose by issue 17 (f199817f82962d67 before): data.val/val_per_class/val_seed, seed, stop, robustness,
    teacher/student min_steps/max_steps; by issues 29 and 31 (70b9cd99da2a1ba2 before): stop.best/test/alpha,
    select.share_start/share_step/align/align_iterations; by issue 31 again (8415371aaa5d3d38 before): select.mode
    and select.align auto (what a run makes of them depends on whether round 0 pretrains); by issue 27
    (7d19336c33f4e4be before): resources.torch_threads 0, the CPUs less the loader workers."""
    assert load_config(DEFAULT_CONFIG).digest() == "9dbcbc56386e0282"


@pytest.mark.parametrize(
    "override, message",
    [
        ("rounds=0", "config.rounds: must be >= 1 (round 0 trains the teacher, rounds 1..N the students), got 0"),
        (
            "ladder.0.randaug_m=11",
            "config.ladder[0].randaug_m: must be in [0, 10] (timm's scale; paper M=27 of 30 is 9), got 11.0",
        ),
        ("ladder.1.drop_rate=1", "config.ladder[1].drop_rate: must be in [0, 1), got 1.0"),
        ("pseudo_label.temperature=0", "config.pseudo_label.temperature: must be > 0, got 0.0"),
        ("student.optimizer=adam", "config.student.optimizer: must be one of sgd, adamw, rmsprop, got 'adam'"),
        ("select.mode=5", "config.select.mode: expected str, got int 5"),
        ("data.channels=true", "config.data.channels: expected int, got bool True"),
        ("data.channels=2", "config.data.channels: must be 1 (grayscale) or 3 (RGB), got 2"),
        ("data.mean=[true]", "config.data.mean[0]: expected float, got bool True"),
        ("data.labeled=[]", "config.data.labeled: give at least one shard path or pattern"),
        ("data.labeled=!!set {a}", "config.data.labeled: expected a list, got set"),
        ("data.prepare_labeled_per_class=0", "config.data.prepare_labeled_per_class: must be in [1, 10], got 0"),
        (
            "data.prepare_labeled_per_class=2",
            "config.data.prepare_labeled_per_class: 2 says how prepare_digits writes the digits; set prepare_digits "
            "(the folder) too, or leave it at 10",
        ),
        ("ladder=[5]", "config.ladder[0]: expected a mapping of ModelSpec fields, got int"),
        (
            "student.distill=[{name: kd, wieght: 1}]",
            "config.student.distill[0].wieght: unknown key; did you mean 'weight'?",
        ),
        ("rounds=0|roundz=1", "config.roundz: unknown key; did you mean 'rounds'?"),  # unknown keys come first
        ("student.epochs=0|student.lr=x", "config.student.lr: expected float, got str 'x'"),  # then wrong types
    ],
)
def test_messages_are_worded_as_before(tree, override, message):
    assert _refused(tree, *override.split("|")) == message


def test_a_config_without_a_data_section_names_the_first_missing_key(tree):
    del tree["data"]
    assert _refused(tree) == "config.data.labeled: give at least one shard path or pattern"


def test_stage_configs_are_validated_in_code_too_and_stay_dataclasses():
    """Constructing or ``dataclasses.replace``-ing a config validates it: one ``ValueError`` line naming the field;
    scalars are strict there as in YAML (an int still becomes a float, a single value a tuple)."""
    cfg = TrainConfig(lr=1, randaug_ops="Rotate")
    assert type(cfg.lr) is float and cfg.randaug_ops == ("Rotate",)
    for make, message in [
        (lambda: TrainConfig(epochs="3"), "epochs: expected int, got str '3'"),
        (lambda: dataclasses.replace(cfg, epochs=0), "epochs: must be > 0, got 0"),
        (lambda: ModelSpec(randaug_n=True), "randaug_n: expected int, got bool True"),
        (
            lambda: TrainConfig(distill=[{"name": "kd"}]),
            "distill: kd read the teacher's outputs; set online_teacher: true",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value) == message
    assert dataclasses.is_dataclass(cfg) and dataclasses.asdict(cfg)["randaug_ops"] == ("Rotate",)


def test_the_config_gives_the_stages_their_resources(tree):
    from stages.core.stage import TrainResources

    resources = load_config(None, ["resources.train_workers=2", "resources.label_threads=3"], base=tree).resources
    assert resources.train() == TrainResources(
        workers=2, use_gpu=False, cpus_per_worker=1.0, max_failures=2, runtime="auto", gpus_per_worker=1.0
    )
    assert resources.label().threads == 3 and resources.executor == "auto"
    warm = load_config(None, ["resources.train_runtime=warm", "resources.gpus_per_train_worker=0.5"], base=tree)
    assert warm.resources.train().runtime == "warm" and warm.resources.train().gpus_per_worker == 0.5


def test_a_warm_trainer_is_one_worker(tree):
    message = _refused(tree, "resources.train_runtime=warm", "resources.train_workers=2")
    assert "train_runtime: warm keeps one training actor; train_workers 2 (DDP) needs ray_train or auto" in message
    assert "resources.train_runtime" in _refused(tree, "resources.train_runtime=always")


def test_gpu_decoding_needs_label_actors_on_gpus(tree):
    message = _refused(tree, "resources.label_decode=gpu")
    assert "label_decode: gpu needs gpus_per_label_actor" in message
    assert "resources.label_decode" in _refused(tree, "resources.label_decode=nvjpeg")
    cfg = load_config(None, ["resources.label_decode=gpu", "resources.gpus_per_label_actor=1"], base=tree)
    assert cfg.resources.label().decode == "gpu"
    # new keys at their defaults leave a run's identity (resume) as it was
    assert cfg.identity()["resources"]["label_decode"] == "gpu"
    default = load_config(None, [], base=tree).identity()["resources"]
    assert "label_decode" not in default and "label_max_actors" not in default


def test_decode_tasks_take_their_cpus_from_the_config(tree):
    cfg = load_config(None, ["resources.label_decode=tasks", "resources.label_decode_cpus=2"], base=tree)
    assert (cfg.resources.label().decode, cfg.resources.label().decode_cpus) == ("tasks", 2.0)
    assert "resources.label_decode_cpus" in _refused(tree, "resources.label_decode_cpus=0")
    assert "label_decode_cpus" not in load_config(None, [], base=tree).identity()["resources"]
