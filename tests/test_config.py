import json
from pathlib import Path

import pytest
import yaml

from b2txt.config import json_schema, load_config, parse_config, section_config_file
from b2txt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_schema_file_is_generated_from_the_typed_config():
    on_disk = json.loads((ROOT / "workflow/schemas/config.schema.json").read_text())
    assert on_disk == json_schema(), "run `b2txt config-schema --out workflow/schemas/config.schema.json`"


@pytest.mark.parametrize("name", ["config/config.yaml", "tests/configs/tiny.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / name)
    assert cfg.train.num_training_batches >= 1
    assert cfg.data.source == "simulated"


def test_default_config_file_sets_every_section_explicitly():
    raw = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    assert set(raw) == {"run", "data", "corpus", "simulate", "train", "infer"}


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
