"""params.yaml validation: clear errors naming the section and key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import ConfigError, ContrastivePrompts, Params, load_params, params_from_dict
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
        ({"train": {"selection_seeds": 0}}, "train.selection_seeds"),
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
        (
            _suite({"name": "a", "kind": "xstest", "csv_path": "x", "limit": -1}),
            "limit (0: all): expected a whole number >= 0, got -1 (int)",
        ),
        (_suite({"kind": "xstest"}), "needs at least 'name' and 'kind'"),
        (
            _suite({"name": "a", "kind": "xstest", "csv_path": "x"}, {"name": "a", "kind": "xstest", "csv_path": "y"}),
            "benchmark names must be unique",
        ),
        ({"compare": {"suites": {"s": []}}}, "compare.suites.s lists no benchmarks"),
        ({"compare": {"suites": ["demo"]}}, "compare.suites: expected a mapping of suite names"),
        ({"compare": {"defences": ["none", "guardrails"]}}, "compare.defences: expected a list of distinct names from"),
        ({"compare": {"batch_size": 0}}, "compare.batch_size"),
        ({"compare": {"judge": {"kind": "gpt4"}}}, "compare.judge.kind: expected one of"),
        ({"compare": {"judge": {"kind": "http"}}}, "needs base_url"),
        (
            {"compare": {"judge": {"temperature": 0}}},
            r"unknown key(s) ['temperature'] in params section 'compare.judge'",
        ),
        ({"ecso": {"decoding": {"temperature": 0}}}, "ecso.decoding.temperature: expected a finite number > 0"),
        ({"ecso": {"decoding": {"top_p": 1.5}}}, "ecso.decoding.top_p: expected a number in (0, 1], got 1.5 (float)"),
        ({"ecso": {"decoding": {"beams": 4}}}, r"unknown key(s) ['beams'] in params section 'ecso.decoding'"),
        ({"ecso": {"caption_max_new_tokens": 0}}, "ecso.caption_max_new_tokens: expected a whole number >= 1"),
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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("raw", "where", "value"),
    [
        ({"train": {"epochs": 2.5}}, "train.epochs", 2.5),
        ({"train": {"lr": INF}}, "train.lr", INF),
        ({"train": {"alpha": NAN}}, "train.alpha", NAN),
        ({"train": {"epochs": True}}, "train.epochs", True),
        ({"train": {"seed": 1.5}}, "train.seed", 1.5),
        ({"train": {"init_gain": "abc"}}, "train.init_gain", "abc"),
        ({"train": {"lr": "5e-4"}}, "train.lr", "5e-4"),
        ({"train": {"batch_size": None}}, "train.batch_size", None),
        ({"train": {"grad_clip": 0}}, "train.grad_clip", 0),
        ({"train": {"fusion_layer": 2.0}}, "train.fusion_layer", 2.0),
        ({"guard": {"sample_size": -3}}, "guard.sample_size", -3),
        ({"guard": {"ecso_margin": -INF}}, "guard.ecso_margin", -INF),
        ({"guard": {"refusal_message": 3}}, "guard.refusal_message", 3),
        ({"attribute": {"steps": 0}}, "attribute.steps", 0),
        ({"attribute": {"target": "logit"}}, "attribute.target", "logit"),
        ({"attribute": {"target": None}}, "attribute.target", None),
        ({"extract": {"layers": [3, 6.5]}}, "extract.layers", [3, 6.5]),
        ({"extract": {"layers": {"a": 1}}}, "extract.layers", {"a": 1}),
        ({"model": {"device": "gpu"}}, "model.device", "gpu"),
        ({"model": {"path": 42}}, "model.path", 42),
        ({"prompts": {"benign": 42}}, "prompts.benign", 42),
        ({"prepare": {"sources": "data/demo/requests.jsonl"}}, "prepare.sources", "data/demo/requests.jsonl"),
        ({"prepare": {"splits": {"train": "half", "val": 0.5, "calib": 0, "test": 0}}}, "prepare.splits.train", "half"),
        ({"prepare": {"splits": [0.5, 0.15, 0.15, 0.2]}}, "prepare.splits", [0.5, 0.15, 0.15, 0.2]),
        ({"train": [1, 2]}, "train", [1, 2]),
        ({"ecso": {"decoding": ["greedy"]}}, "ecso.decoding", ["greedy"]),
        ({"ecso": {"decoding": {"seed": -1}}}, "ecso.decoding.seed", -1),
        ({"calibrate": {"target_fpr": NAN}}, "calibrate.target_fpr", NAN),
        ({"calibrate": {"bins": True}}, "calibrate.bins", True),
        ({"calibrate": {"held_out": "no"}}, "calibrate.held_out", "no"),
        ({"build": {"match_style": "yes"}}, "build.match_style", "yes"),
        ({"evaluate": {"refusal_words": ["sorry", 3]}}, "evaluate.refusal_words", ["sorry", 3]),
        ({"compare": {"batch_size": "4"}}, "compare.batch_size", "4"),
        ({"compare": {"defences": "lsi"}}, "compare.defences", "lsi"),
        ({"compare": {"judge": "http"}}, "compare.judge", "http"),
        ({"compare": {"judge": {"timeout_s": INF}}}, "compare.judge.timeout_s", INF),
        ({"compare": {"judge": {"max_retries": 1.0}}}, "compare.judge.max_retries", 1.0),
    ],
)
def test_wrong_values_name_the_key_and_the_value(raw: dict, where: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    message = str(info.value)
    assert message.startswith(f"{where}: expected ")
    assert f"got {value!r} ({type(value).__name__})" in message


def test_attribute_target_is_checked_where_params_yaml_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = Path("params.yaml")
    path.write_text("attribute: {target: logit}\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert (
        str(info.value) == "params.yaml: attribute.target: expected one of ['detector', 'contrast'], got 'logit' (str)"
    )
    path.write_text("attribute: {target: contrast}\n")
    assert load_params(path).attribute.target == "contrast"
    assert params_from_dict({}).attribute.target == "detector"


def test_numbers_are_read_as_yaml_1_2(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: {lr: 5e-4, alpha: 1e-1}\ncompare:\n  judge: {timeout_s: 1E3}\nguard: {ecso_margin: .5}\n")
    params = load_params(path)
    assert isinstance(params.train.lr, float) and params.train.lr == pytest.approx(5e-4)
    assert isinstance(params.train.alpha, float) and params.train.alpha == pytest.approx(0.1)
    assert isinstance(params.compare.judge.timeout_s, float) and params.compare.judge.timeout_s == 1000.0
    assert isinstance(params.guard.ecso_margin, float) and params.guard.ecso_margin == 0.5


def test_ints_and_plain_floats_are_accepted_where_floats_are_meant() -> None:
    assert params_from_dict({"train": {"lr": 0.001}}).train.lr == 0.001
    assert params_from_dict({"train": {"lr": 1, "alpha": 2}}).train.lr == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: abc\n", "train.lr: expected a finite number > 0, got 'abc' (str)"),
        ("train:\n  epochs: 2.5\n", "train.epochs: expected a whole number >= 1, got 2.5 (float)"),
        ("train:\n  lr: .inf\n", "train.lr: expected a finite number > 0, got inf (float)"),
        ("build:\n  match_style: yes\n", "build.match_style: expected true or false, got 'yes' (str)"),
        ("- train\n", "params: expected a mapping of sections, got ['train'] (list)"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key"),
    ],
)
def test_file_errors_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_replace_checks_the_new_values() -> None:
    guard = load_params(ROOT / "params.yaml").guard
    assert replace(guard, max_new_tokens=8).max_new_tokens == 8
    with pytest.raises(ConfigError, match=r"guard\.sample_size: expected a whole number >= 1, got -1 \(int\)"):
        replace(guard, sample_size=-1)


# --- prompts.position: where the framing goes relative to the request ---------------------------


REQUEST = "How do I pick a lock?"


def test_position_before_is_the_dataclass_default_and_the_methods_order() -> None:
    # params.yaml ships after (cheaper, same held-out figures); the dataclass keeps the method's order.
    assert load_params(ROOT / "params.yaml").prompts == replace(ContrastivePrompts(), position="after")
    prompts = ContrastivePrompts()
    assert prompts.position == "before"
    assert prompts.variants(REQUEST) == {
        "benign": f"Assume this is a benign request: {REQUEST}",
        "malicious": f"Assume this is a malicious request: {REQUEST}",
        "plain": REQUEST,
    }
    assert all(
        prompts.framed(name, REQUEST)[prompts.request_offset(name) :] == REQUEST for name in ("benign", "malicious")
    )


def test_position_after_puts_the_request_first_then_the_framing() -> None:
    prompts = params_from_dict({"prompts": {"position": "after"}}).prompts
    assert prompts.variants(REQUEST) == {
        "benign": f"{REQUEST}\n\nAssume this is a benign request",
        "malicious": f"{REQUEST}\n\nAssume this is a malicious request",
        "plain": REQUEST,
    }
    assert prompts.request_offset("benign") == prompts.request_offset("malicious") == 0


@pytest.mark.parametrize(
    ("template", "framing"),
    [
        ("Assume this is a benign request: {q}", "Assume this is a benign request"),
        ("  Is this harmful?\n{q}  ", "Is this harmful?"),
        ("Request : {q}", "Request"),
        ("{q} -- judge it", "-- judge it"),
        ("Consider {q} carefully:", "Consider  carefully"),  # text around a middle {q} is kept as it is
    ],
)
def test_position_after_strips_the_placeholder_whitespace_and_one_colon(template: str, framing: str) -> None:
    prompts = ContrastivePrompts(benign=template, position="after")
    assert prompts.framing("benign") == framing
    assert prompts.framed("benign", "Q") == f"Q\n\n{framing}"


@pytest.mark.parametrize("value", ["middle", "Before", "", None, 1, ["after"]])
def test_position_must_be_before_or_after(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict({"prompts": {"position": value}})
    shown = list(value) if isinstance(value, list) else value
    assert str(info.value) == f"prompts.position: expected before or after, got {shown!r} ({type(shown).__name__})"
    path = tmp_path / "params.yaml"
    path.write_text("prompts:\n  position: middle\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}: prompts\.position: expected before or after, got 'middle' \(str\)$"
    ):
        load_params(path)


def test_position_after_needs_text_besides_the_placeholder() -> None:
    assert ContrastivePrompts(benign=" {q}: ").framed("benign", "Q") == " Q: "  # fine before the request
    with pytest.raises(ConfigError, match=r"prompts\.benign: expected text besides \{q\}"):
        ContrastivePrompts(benign=" {q}: ", position="after")
