import json
from pathlib import Path

import pytest
import yaml

from b2txt.ground.config import ModelConfig, TrainConfig, json_schema, load_config, parse_config, section_config_file
from b2txt.ground.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_schema_file_is_generated_from_the_typed_config():
    on_disk = json.loads((ROOT / "workflow/schemas/config.schema.json").read_text())
    assert on_disk == json_schema(), "run `b2txt config-schema --out workflow/schemas/config.schema.json`"


BASE = [ROOT / "config/config.yaml", ROOT / "config/model/baseline.yaml"]


@pytest.mark.parametrize("overlay", [[], ["tests/configs/tiny.yaml"], ["config/model/triple.yaml"],
                                     ["config/model/paper.yaml"]])
def test_shipped_configs_are_valid(overlay):
    cfg = load_config(BASE + [ROOT / o for o in overlay])
    assert cfg.train.num_training_batches >= 1
    assert cfg.data.source == "simulated"


def test_presets_are_complete_train_sections():
    """Each preset sets every train knob, so it means the same alone or merged."""
    triple_only = {"adversarial_weight", "noise_units", "noise_layers", "noisy_units", "noisy_layers", "grl_scale"}
    for name in ("baseline", "paper", "triple"):
        train = yaml.safe_load((ROOT / f"config/model/{name}.yaml").read_text())["train"]
        keys = set(train) | set(train["model"])
        wanted = set(TrainConfig.model_fields) | set(ModelConfig.model_fields)
        assert keys == (wanted if name == "triple" else wanted - triple_only), name
    assert load_config(ROOT / "config/model/triple.yaml").train.model.architecture == "triple"
    paper = load_config(ROOT / "config/model/paper.yaml").train
    assert (paper.model.n_units, paper.model.n_layers, paper.batch_size, paper.num_training_batches) == (768, 5, 64, 120000)


def test_default_config_file_sets_every_other_section_explicitly():
    from b2txt.ground.config import PipelineConfig

    raw = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert set(raw) == set(PipelineConfig.model_fields) - {"train"}  # train: the presets
    for name, section in raw.items():  # every knob written out (and so documented in place)
        if isinstance(section, dict):
            assert set(section) == set(PipelineConfig.model_fields[name].annotation.model_fields), name


def test_one_set_of_defaults():
    """The built-in defaults are the default run's: config/config.yaml and the baseline preset write the
    same values out (documented in place), so a command given no --config behaves as with those files."""
    from b2txt.ground.config import PipelineConfig

    assert PipelineConfig() == load_config(BASE) == load_config(BASE[:1])


def test_commands_read_no_config_from_the_working_directory(tmp_path, monkeypatch, capsys):
    """Without --config a command uses the built-in defaults wherever it runs: a config/config.yaml
    in the working directory does not change how it decodes."""
    from b2txt.cli import main
    from b2txt.ground.config import PipelineConfig

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("decode: {acoustic_scale: 9.0}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["config-show"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["decode"]["acoustic_scale"] == PipelineConfig().decode.acoustic_scale == 1.5
    assert main(["config-show", "--config", "config/config.yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"]["acoustic_scale"] == 9.0


def test_later_files_override_earlier_ones(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train: {seed: 1, batch_size: 8, model: {n_units: 10, n_layers: 1}}\n")
    b.write_text("train: {seed: 2, model: {n_units: 20}}\n")
    cfg = load_config([a, b]).train
    assert (cfg.seed, cfg.batch_size, cfg.model.n_units, cfg.model.n_layers) == (2, 8, 20, 1)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"train\.modle"):
        parse_config({"train": {"modle": {}}})


def test_bad_range_and_value_are_errors():
    with pytest.raises(ConfigError, match="phoneme_ms"):
        parse_config({"simulate": {"neural": {"phoneme_ms": {"low": 200, "high": 100}}}})
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="corpus_mix"):
        parse_config({"simulate": {"corpus_mix": {"Shakespeare": 1.0}}})
    with pytest.raises(ConfigError, match="packed: XLA needs static shapes"):
        parse_config({"train": {"packed": True, "device": "xla"}})
    assert parse_config({"train": {"packed": "auto", "device": "xla"}}).train.packed == "auto"


def test_an_lm_source_needs_its_path():
    with pytest.raises(ConfigError, match=r"lm: .*source arpa needs lm\.arpa"):
        parse_config({"lm": {"source": "arpa"}})
    with pytest.raises(ConfigError, match=r"lm: .*source dir needs lm\.dir"):
        parse_config({"lm": {"source": "dir"}})
    with pytest.raises(ConfigError, match=r"lm\.source"):
        parse_config({"lm": {"source": "srilm"}})
    assert parse_config({"lm": {"source": "arpa", "arpa": "lms/lab.arpa.gz"}}).lm.arpa == "lms/lab.arpa.gz"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_string_overrides_from_snakemake_are_coerced():
    cfg = parse_config({"train": {"num_training_batches": "7", "augment": {"smooth_data": "false"}}})
    assert cfg.train.num_training_batches == 7
    assert cfg.train.augment.smooth_data is False


def test_section_config_files_are_content_addressed(tmp_path):
    a = section_config_file({"train": {"seed": 1}}, tmp_path, "train")
    b = section_config_file({"train": {"seed": 1}, "simulate": {"seed": 5}}, tmp_path, "train")
    c = section_config_file({"train": {"seed": 2}}, tmp_path, "train")
    assert a == b and a != c  # other sections do not change a rule's file
    assert load_config(c).train.seed == 2
    mtime = Path(a).stat().st_mtime_ns
    section_config_file({"train": {"seed": 1}}, tmp_path, "train")
    assert Path(a).stat().st_mtime_ns == mtime  # never rewritten
