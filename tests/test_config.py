"""The typed run config: YAML + overrides, field-naming errors, round trip, hash."""

import pytest

from treelora.config import ConfigError, RunConfig, load_config

pytestmark = pytest.mark.unit


def test_defaults_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ntrain:\n  epochs: 2\nadapter:\n  targets: [q, k, v]\n")
    cfg = load_config(path, ["method.name=seq-lora", "scaling.num_workers=4"])
    assert (cfg.name, cfg.train.epochs, cfg.adapter.targets, cfg.method.name, cfg.scaling.num_workers) == ("demo", 2, ("q", "k", "v"), "seq-lora", 4)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.digest() == RunConfig.from_dict(cfg.to_dict()).digest() != RunConfig().digest()
    assert cfg.flat()["adapter.targets"] == '["q", "k", "v"]'


@pytest.mark.parametrize(
    "text, field",
    [
        ("train:\n  epochs: two\n", "train.epochs"),
        ("train:\n  epoch: 2\n", "train.epoch"),
        ("scaling:\n  use_gpu: 1\n", "scaling.use_gpu"),
        ("methods:\n  name: x\n", "methods"),
        ("train: 3\n", "train"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="method.nme"):
        load_config(None, ["method.nme=x"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["nonsense"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("override, field", [
    ("tree.leaf_size=0", "tree.leaf_size"), ("eval.batch_size=0", "eval.batch_size"), ("train.lr=.nan", "train.lr"),
    ("train.lr=.inf", "train.lr"), ("adapter.dropout=1.5", "adapter.dropout"), ("scaling.max_failures=-5", "scaling.max_failures"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker"), ("method.strength=.nan", "method.strength"),
    ("train.weight_decay=-1", "train.weight_decay"), ("model.name=/nonexistent", "model.name"),
    ("scaling.checkpoint_every=0", "scaling.checkpoint_every"),
])
def test_every_field_out_of_range_is_refused_up_front_naming_it(tmp_path, override, field):
    from treelora.data import SAMPLE_ROOT
    from treelora.train.validate import validate_config, validate_stream

    cfg = load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp_path / 'runs'}", override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(cfg)
        validate_stream(cfg)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_workdir_that_is_a_file_and_a_manifest_that_is_not_yaml_are_named(tmp_path):
    from treelora.data import SAMPLE_ROOT
    from treelora.train.validate import validate_config, validate_stream

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=f"workdir '{a_file}' is a file"):
        validate_config(load_config(None, [f"workdir={a_file}"]))
    manifest = tmp_path / "stream.yaml"
    manifest.write_text("name: x\ntasks: [\n")
    cfg = load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", f"stream.spec={manifest}",
                             f"workdir={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match=rf"{manifest}: the stream manifest is not valid YAML at line 3"):
        validate_stream(cfg)
