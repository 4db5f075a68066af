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
