"""params.yaml validation: clear errors naming the section and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Params, load_params, params_from_dict
from pipeline.data.benchmarks.suites import check_suites
from tests.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


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


def test_shipped_params_name_the_demo_and_dev_suites() -> None:
    compare = load_params(ROOT / "params.yaml").compare
    assert [name for name, _ in compare.suites] == ["demo", "dev"]
    assert compare.suite("demo")[0].kind == "prepared"
    assert {spec.kind for spec in compare.suite("dev")} == {"mm-safetybench", "mm-vet", "alpaca-seed"}
    with pytest.raises(ConfigError, match=r"no suite 'full'; known: \['demo', 'dev'\]"):
        compare.suite("full")


def _suite(*benchmarks: dict) -> dict:
    return {"compare": {"suites": {"s": list(benchmarks)}}}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_suite({"name": "a", "kind": "nope"}), r"compare.suites.s[0]: benchmark 'a': unknown kind 'nope'"),
        (_suite({"name": "a", "kind": "xstest", "csv": "x.csv"}), r"unknown option(s) ['csv'] for kind 'xstest'"),
        (_suite({"name": "a", "kind": "xstest"}), r"kind 'xstest' needs option(s) ['csv_path']"),
        (_suite({"name": "a", "kind": "xstest", "csv_path": "x", "limit": -1}), "limit must be a whole number"),
        (_suite({"kind": "xstest"}), "needs at least 'name' and 'kind'"),
        (
            _suite({"name": "a", "kind": "xstest", "csv_path": "x"}, {"name": "a", "kind": "xstest", "csv_path": "y"}),
            "benchmark names must be unique",
        ),
        ({"compare": {"suites": {"s": []}}}, "compare.suites.s lists no benchmarks"),
        ({"compare": {"suites": ["demo"]}}, "compare.suites must map suite names"),
        ({"compare": {"defences": ["none", "guardrails"]}}, "compare.defences must be distinct names"),
        ({"compare": {"batch_size": 0}}, "compare.batch_size"),
        ({"compare": {"judge": {"kind": "gpt4"}}}, "compare.judge.kind must be one of"),
        ({"compare": {"judge": {"kind": "http"}}}, "needs base_url"),
        (
            {"compare": {"judge": {"temperature": 0}}},
            r"unknown key(s) ['temperature'] in params section 'compare.judge'",
        ),
        ({"ecso": {"decoding": {"temperature": 0}}}, "params section 'ecso.decoding': temperature must be > 0"),
        ({"ecso": {"decoding": {"top_p": 1.5}}}, "top_p must be in (0, 1]"),
        ({"ecso": {"decoding": {"beams": 4}}}, r"unknown key(s) ['beams'] in params section 'ecso.decoding'"),
        ({"ecso": {"caption_max_new_tokens": 0}}, "ecso.caption_max_new_tokens must be a whole number"),
    ],
)
def test_bad_compare_and_ecso_settings_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_suites(params_from_dict(raw).compare)  # loader kinds and options are checked against the loaders
    assert message in str(info.value)


def test_a_benchmark_spec_keeps_its_loader_options() -> None:
    params = params_from_dict(
        _suite({"name": "mmsb", "kind": "mm-safetybench", "folder": "bench", "variant": "text", "limit": 5})
    )
    (spec,) = params.compare.suite("s")
    assert (spec.name, spec.kind, spec.limit) == ("mmsb", "mm-safetybench", 5)
    assert spec.kwargs == {"folder": "bench", "variant": "text"}
    sampled = params_from_dict({"ecso": {"decoding": {"do_sample": True, "temperature": 0.7, "seed": 3}}})
    assert sampled.ecso.decoding.do_sample and not sampled.ecso.decoding.greedy
