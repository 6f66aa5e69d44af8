"""params.yaml validation: clear errors naming the section and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Params, load_params, params_from_dict

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_params_load() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    for layer in (params.train.fusion_layer, params.train.safety_layer):
        assert layer == "best" or layer in params.extract.layers
    assert dict(params.prepare.split_fractions)["train"] == pytest.approx(0.5)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\] in params section 'train'"):
        params_from_dict({"train": {"learning_rate": 0.1}})


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown params section"):
        params_from_dict({"trian": {}})


def test_probe_layers_must_be_stored() -> None:
    with pytest.raises(ConfigError, match=r"train.fusion_layer=20 is not among extract.layers"):
        params_from_dict({"train": {"fusion_layer": 20}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"kind": "onnx"}}, "model.kind"),
        ({"calibrate": {"target_fpr": 1.5}}, "target_fpr"),
        ({"prepare": {"splits": {"train": 0.9, "test": 0.1}}}, "prepare.splits"),
        ({"prompts": {"benign": "no placeholder"}}, "prompts.benign"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"fusion_layer": "deepest"}}, "train.fusion_layer"),
        ({"train": {"class_weight": "inverse"}}, "train.class_weight"),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
        ({"train": {"select_by": "test"}}, "train.select_by"),
        ({"calibrate": {"method": "youden"}}, "calibrate.method"),
        ({"calibrate": {"scaling": "isotonic"}}, "calibrate.scaling"),
        ({"build": {"per_source": 0}}, "build.per_source"),
        ({"evaluate": {"refusal_layers": [99]}}, "evaluate.refusal_layers"),
    ],
)
def test_bad_values_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        params_from_dict(raw)


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_params(path)


def test_model_dtype_accepts_auto_and_refuses_others() -> None:
    assert params_from_dict({"model": {"dtype": "auto"}}).model.dtype == "auto"
    with pytest.raises(ConfigError, match="model.dtype"):
        params_from_dict({"model": {"dtype": "int8"}})


def test_best_layers_are_accepted() -> None:
    params = params_from_dict({"train": {"fusion_layer": "best", "safety_layer": 3}})
    assert params.train.fusion_layer == "best" and not params.train.layers_fixed
