"""The typed run config: YAML + overrides, field-naming errors, round trip, hash; every method's
own settings in the method section."""

import dataclasses
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treelora.config import ConfigError, RunConfig, load_config
from treelora.methods import METHODS, make_method
from treelora.methods.settings import MethodSettings, method_name, setting

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

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        # a method's settings are refused as the config is read (its config class checks them), the rest by validate
        cfg = load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp_path / 'runs'}", override])
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


# == the method section: each method's own config class =========================================
def _settings(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(METHODS[name].config_class) if f.name != "name"}


BOUNDED = [(name, field) for name in sorted(METHODS) for field, f in _settings(name).items()
           if f.metadata["min"] is not None or f.metadata["max"] is not None]


def _out_of_range(f: dataclasses.Field) -> list:
    if f.metadata.get("choices"):
        return ["no-such-choice"]
    lo, hi, meta = f.metadata["min"], f.metadata["max"], f.metadata
    values = [] if lo is None else [lo if not meta["min_inclusive"] else lo - 1]
    return values + ([] if hi is None else [hi if not meta["max_inclusive"] else hi + 1])


def test_config_imports_without_torch():
    code = "import sys, treelora.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_method_section_holds_only_the_chosen_methods_settings():
    assert set(RunConfig().to_dict()["method"]) == {"name", "regulariser", "strength", "anchor_selector", "direction_strength", "bandit_c",
                                                    "signature_max_width", "signature_sketch_width"}
    assert {k for k in RunConfig().identity() if k.startswith("method.")} == {f"method.{k}" for k in RunConfig().to_dict()["method"]}
    assert all(METHODS[name].config_class().name == name for name in METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_defaults_round_trip_and_build_the_method(name, tmp_path):
    cls = METHODS[name].config_class
    cfg = load_config(None, [f"method.name={name}"])
    assert cfg.method == cls() and cfg.to_dict()["method"] == dataclasses.asdict(cls())
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(f"method:\n  name: {name}\n")
    assert load_config(path) == cfg
    assert type(make_method(cfg.method)) is METHODS[name]


@pytest.mark.parametrize("name, field", BOUNDED)
def test_each_setting_out_of_range_is_refused_naming_it(name, field):
    for value in _out_of_range(_settings(name)[field]):
        with pytest.raises(ConfigError, match=rf"method\.{field} must be"):
            load_config(None, [f"method.name={name}", f"method.{field}={value}"])
        with pytest.raises(ConfigError, match=rf"method\.{field} must be"):
            METHODS[name].config_class(**{field: value})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_setting_of_another_method_is_refused_naming_it(name, tmp_path):
    others = sorted({f for other in METHODS for f in _settings(other)} - set(_settings(name)))
    for field in others:
        with pytest.raises(ConfigError, match=rf"method\.{field} is not a setting of method '{name}' \(its settings: "):
            load_config(None, [f"method.name={name}", f"method.{field}=1"])
    path = tmp_path / "run.yaml"
    path.write_text(f"method:\n  name: {name}\n  {others[0]}: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}: method\.{others[0]} is not a setting"):
        load_config(path)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_switching_method_by_override_fills_its_defaults_and_keeps_given_settings(name, tmp_path):
    start = "l2-anchor" if name == "o-lora" else "o-lora"
    path = tmp_path / "run.yaml"
    path.write_text(f"method:\n  name: {start}\n  {next(iter(_settings(start)))}: 0.25\n")
    assert load_config(path, [f"method.name={name}"]).method == METHODS[name].config_class()
    for field, f in _settings(name).items():
        choices = f.metadata.get("choices")
        value = (0.5 if f.default is None else f.default + 1) if not choices else next(c for c in choices if c != f.default)
        given = METHODS[name].config_class(**{field: value})
        assert load_config(path, [f"method.name={name}", f"method.{field}={value}"]).method == given
        assert load_config(path, [f"method.{field}={value}", f"method.name={name}"]).method == given
    assert load_config(None, ["method.name=l2-anchor", "method.l2_strength=2"]).method.l2_strength == 2.0
    assert load_config(path, [f"method.name={start}"]).method == load_config(path).method  # the same method: kept
    assert load_config(path).method != METHODS[start].config_class()


def test_an_unknown_method_name_lists_the_methods():
    with pytest.raises(ConfigError, match=r"method\.name 'ewc' is not one of \['joint', "):
        load_config(None, ["method.name=ewc"])


def test_a_method_registered_in_methods_is_all_the_config_needs(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class EchoConfig(MethodSettings):
        name: str = method_name("echo")
        echo: float = setting(0.5, "how loud", lo=0, hi=1, hi_inclusive=False)

    class Echo:
        name, config_class = "echo", EchoConfig

        def __init__(self, cfg: EchoConfig):
            self.cfg = cfg

    monkeypatch.setitem(METHODS, "echo", Echo)
    cfg = load_config(None, ["method.name=echo", "method.echo=0.25"])
    assert cfg.to_dict()["method"] == {"name": "echo", "echo": 0.25} and make_method(cfg.method).cfg.echo == 0.25
    with pytest.raises(ConfigError, match=r"method\.echo must be >= 0 and < 1, got 1"):
        load_config(None, ["method.name=echo", "method.echo=1"])


@pytest.mark.parametrize("name, field", BOUNDED)
@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_for_a_bounded_setting_is_in_range_or_refused_naming_it(name, field, value):
    f = _settings(name)[field]
    try:
        cfg = RunConfig.from_dict({"method": {"name": name, field: value}})
    except ConfigError as exc:
        assert f"method.{field}" in str(exc)
        return
    got, lo, hi, meta = getattr(cfg.method, field), f.metadata["min"], f.metadata["max"], f.metadata
    assert math.isfinite(got) and got == value
    assert lo is None or (got >= lo if meta["min_inclusive"] else got > lo)
    assert hi is None or (got <= hi if meta["max_inclusive"] else got < hi)


def test_adding_a_method_is_one_module(tmp_path, monkeypatch):
    """A module dropped into the methods package is found, configured and built with no other edit."""
    import treelora.methods as methods

    (tmp_path / "keep_half.py").write_text(
        "import dataclasses\n"
        "from treelora.methods.base import NoExtraState\n"
        "from treelora.methods.settings import MethodSettings, method_name, setting\n\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class KeepHalfConfig(MethodSettings):\n"
        "    name: str = method_name('keep-half')\n"
        "    share: float = setting(0.5, 'share of modules trained', lo=0, hi=1)\n\n"
        "class KeepHalf(NoExtraState):\n"
        "    name = 'keep-half'\n"
        "    config_class = KeepHalfConfig\n"
        "    def __init__(self, cfg):\n"
        "        self.share = cfg.share\n")
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    found = methods._discover()
    assert set(found) == set(METHODS) | {"keep-half"}
    monkeypatch.setitem(METHODS, "keep-half", found["keep-half"])
    cfg = load_config(None, ["method.name=keep-half", "method.share=0.25"])
    assert make_method(cfg.method).share == 0.25
    with pytest.raises(ConfigError, match=r"method\.share must be"):
        load_config(None, ["method.name=keep-half", "method.share=2"])


def test_quantisation_and_zero3_together_are_refused_naming_both(tmp_path):
    from treelora.train.validate import validate_config

    cfg = load_config(None, [f"workdir={tmp_path / 'runs'}", "model.quantization=4bit", "scaling.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"model\.quantization 4bit cannot be combined with scaling\.zero_stage 3"):
        validate_config(cfg)
