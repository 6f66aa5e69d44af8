"""The ``params.yaml`` sections of the detection pipeline, each a frozen dataclass.

Every section checks all of its fields when it is built (from ``params.yaml``, by a stage, or by
``dataclasses.replace``), so the library only ever receives values that work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.config.checks import (
    ConfigError,
    choice,
    choices,
    cluster_address,
    flag,
    layer_list,
    number,
    positive,
    refuse,
    text,
    texts,
    whole,
)
from pipeline.config.pooling import LAST, POOLINGS
from pipeline.config.prompts import Decoding

LABELS: dict[str, int] = {"benign": 0, "harmful": 1}
SPLITS: tuple[str, ...] = ("train", "val", "calib", "test")
# Index columns a held-out fold can leave out one value of (pipeline/detect/heldout.py).
HELD_OUT_BY: tuple[str, ...] = ("upstream", "presentation", "source")
ALL_LAYERS = "all"  # extract.layers: every decoder block of the model
LAYER_CHOICE = "best"  # train.fusion_layer / train.safety_layer: take the pair the sweep stage found best
MODEL_KINDS: tuple[str, ...] = ("embedded", "hf")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # what torch.device accepts among the devices this project runs on


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to load. ``kind`` is ``embedded`` (the offline default) or ``hf``."""

    kind: str = "embedded"
    path: str = "data/model/smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    ocr_cache: str = "data/cache/ocr"

    def __post_init__(self) -> None:
        choice("model.kind", self.kind, MODEL_KINDS)
        text("model.path", self.path)
        choice("model.dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            refuse("model.device", "auto, cpu, cuda or cuda:N", self.device)
        text("model.ocr_cache", self.ocr_cache)


@dataclass(frozen=True)
class PrepareConfig:
    """Where the request sources are and how to split them."""

    sources: tuple[str, ...] = ("data/demo/requests.jsonl", "data/demo/lookalike.jsonl")
    split_fractions: tuple[tuple[str, float], ...] = (("train", 0.5), ("val", 0.15), ("calib", 0.15), ("test", 0.2))
    seed: int = 0

    def __post_init__(self) -> None:
        texts("prepare.sources", self.sources, nonempty=True)
        names = [name for name, _ in self.split_fractions]
        if sorted(names) != sorted(SPLITS):
            raise ConfigError(f"prepare.splits: expected exactly the splits {list(SPLITS)}, got {names}")
        for name, fraction in self.split_fractions:
            number(f"prepare.splits.{name}", fraction, 0.0, 1.0, low_open=True, high_open=False)
        total = sum(fraction for _, fraction in self.split_fractions)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"prepare.splits: expected fractions summing to 1, got {dict(self.split_fractions)}")
        whole("prepare.seed", self.seed)


@dataclass(frozen=True)
class ExtractConfig:
    """Which decoder layers to store, how each prompt's states are pooled, and how to batch the forward passes.

    ``layers`` is a list of block indices, or ``all`` for every decoder block of the model
    (:meth:`resolved_layers`). ``pooling`` (:mod:`pipeline.config.pooling`): ``last`` (the
    prompt's last token, the method's read), ``mean`` (the average over the request's own tokens)
    or ``both``.
    """

    layers: tuple[int, ...] | str = (3, 6, 9, 12, 15, 18)
    pooling: str = field(default=LAST, kw_only=True)
    batch_size: int = 16
    shard_rows: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != ALL_LAYERS:
            expected = f"'{ALL_LAYERS}' or a list of one or more distinct whole numbers >= 0"
            refuse("extract.layers", expected, self.layers)
        if self.layers != ALL_LAYERS:
            layer_list("extract.layers", self.layers, nonempty=True)
        choice("extract.pooling", self.pooling, POOLINGS)
        whole("extract.batch_size", self.batch_size, 1)
        whole("extract.shard_rows", self.shard_rows, 1)

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        """The stored blocks for a model of ``num_layers`` decoder blocks: ``all`` is ``0 .. num_layers - 1``."""
        if self.layers == ALL_LAYERS:
            return tuple(range(num_layers))
        assert not isinstance(self.layers, str)
        return self.layers

    def holds(self, layer: int) -> bool:
        """Whether block ``layer`` is stored (under ``all``, any block: the model's size is not known here)."""
        return self.layers == ALL_LAYERS or layer in self.layers


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The LSI projector and probe, with the method's hyperparameters as defaults.

    ``fusion_layer`` and ``safety_layer`` are stored block indices, or ``"best"`` for the pair the
    ``sweep`` stage chose (by ``select_by``). The last three options are off by default, as in
    the method: ``standardize`` scales each input feature by training-set mean and std,
    ``weight_decay`` is Adam's L2 term, ``class_weight: balanced`` reweights the loss by class.
    ``held_out_by`` is the index column the held-out folds leave out one value of at a time
    (the sweep's held-out half, the ``best`` detector and held-out calibration use them).
    ``held_out_pairs``: how many layer pairs get the sweep's held-out half (one fit per held-out
    group each), the pairs with the best in-source validation AUROC; 0 scores every pair.
    ``select_tolerance``: scores within this much of the best count as tied, for the layer pair
    and for ``guard.detector: best``; a tie goes to the cheaper pair (shallower deepest block) and
    to the detector with the fewest inputs, so that float rounding (another CPU) cannot flip them.
    ``selection_seeds``: how many seeds (``seed``, ``seed + 1``, ...) LSI is trained with when the
    sweep scores the detectors for ``guard.detector: best``; its held-out AUROC is their mean. One
    seed's score moved by up to 0.02 with the seed or the CPU, enough to change which detector
    ships; the logistic regressions are convex fits, scored once.
    """

    fusion_layer: int | str = 12
    safety_layer: int | str = 3
    alpha: float = 0.1
    lr: float = 5e-4
    batch_size: int = 16
    epochs: int = 15
    grad_clip: float = 1.0
    init_gain: float = 0.02
    seed: int = 0
    standardize: bool = False
    weight_decay: float = 0.0
    class_weight: str = "none"
    chunk_rows: int = 4096
    select_by: str = "held_out"
    held_out_by: str = "upstream"
    held_out_pairs: int = 6
    select_tolerance: float = 0.02
    selection_seeds: int = 3

    def __post_init__(self) -> None:
        for key in ("fusion_layer", "safety_layer"):
            value = getattr(self, key)
            if value != LAYER_CHOICE and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                refuse(f"train.{key}", f"a stored block index (whole number >= 0) or '{LAYER_CHOICE}'", value)
        for key in ("alpha", "lr", "grad_clip", "init_gain"):
            positive(f"train.{key}", getattr(self, key))
        whole("train.batch_size", self.batch_size, 1)
        whole("train.epochs", self.epochs, 1)
        whole("train.seed", self.seed)
        flag("train.standardize", self.standardize)
        number("train.weight_decay", self.weight_decay, 0.0, low_open=False, high_open=True)
        choice("train.class_weight", self.class_weight, ("none", "balanced"))
        whole("train.chunk_rows", self.chunk_rows, 1)
        choice("train.select_by", self.select_by, ("held_out", "val"))
        choice("train.held_out_by", self.held_out_by, HELD_OUT_BY)
        whole("train.held_out_pairs", self.held_out_pairs)
        number("train.select_tolerance", self.select_tolerance, 0.0, 1.0, low_open=False, high_open=True)
        whole("train.selection_seeds", self.selection_seeds, 1)

    @property
    def layers_fixed(self) -> bool:
        """Whether both layers are given (no sweep result needed)."""
        return self.fusion_layer != LAYER_CHOICE and self.safety_layer != LAYER_CHOICE


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig:
    """How the refusal threshold tau is chosen on the calibration split, and how scores are calibrated.

    ``method``: ``target_fpr`` (at most that share of benign calibration requests refused) or
    ``best_f1``. ``scaling``: ``none``, ``platt`` (logistic fit on the score's logit) or
    ``temperature`` (one scale on the logit); fitted on the calibration split, applied before tau.
    ``bins``: equal-width bins for the expected calibration error and the reliability diagram.
    ``held_out``: choose tau (and fit the scaling) on held-out-source scores: each calibration row
    scored by a probe trained without its source, as a request from a new source will be.
    """

    target_fpr: float = 0.05
    method: str = "target_fpr"
    scaling: str = "none"
    bins: int = 10
    held_out: bool = True

    def __post_init__(self) -> None:
        number("calibrate.target_fpr", self.target_fpr, 0.0, 1.0, low_open=True, high_open=True)
        choice("calibrate.method", self.method, ("target_fpr", "best_f1"))
        choice("calibrate.scaling", self.scaling, ("none", "platt", "temperature"))
        whole("calibrate.bins", self.bins, 2)
        flag("calibrate.held_out", self.held_out)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Baselines the evaluation reports next to LSI.

    The refusal-direction score (HiddenDetect-style) projects the plain request's stored
    last-token states through the model's final norm and LM head and sums, over
    ``refusal_layers`` (empty: every stored layer), their cosine similarity to the
    ``refusal_words``' tokens.
    """

    refusal_words: tuple[str, ...] = ("sorry", "Sorry", "cannot", "can't", "unable", "apologize", "illegal", "harmful")
    refusal_layers: tuple[int, ...] = ()
    # Intervals on every printed rate (Wilson) and AUROC / AUPRC / TPR at a fixed FPR (stratified bootstrap).
    bootstrap_resamples: int = 1000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        texts("evaluate.refusal_words", self.refusal_words, nonempty=True)
        layer_list("evaluate.refusal_layers", self.refusal_layers, nonempty=False)
        # Fewer than 100 resamples cannot place a 95% interval's ends (2.5 resamples each side).
        whole("evaluate.bootstrap_resamples", self.bootstrap_resamples, minimum=100)
        number("evaluate.confidence", self.confidence, 0.5, 1.0, low_open=False, high_open=True)


# Wrapper families of the training augmentation (pipeline/data/augment.py).
AUGMENT_FAMILIES: tuple[str, ...] = (
    "padding",
    "roleplay",
    "hypothetical",
    "ignore_previous",
    "framing",
    "claim",
    "forged_turn",
)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """The training-data builder over public instruction and benchmark files (off when both folders are empty).

    ``public``: the vendored public instruction sets (``data/public``, see its README), built into
    four style-matched sources (:mod:`pipeline.data.public`).
    ``benchmarks``: a folder laid out like MM-SafetyBench / MM-Vet / alpaca seed tasks (see the
    docs/data.md). ``per_source``: harmful requests per built source (benign ones are matched to them).
    ``match_style``: build style-matched benign counterparts (true) or take benign requests as
    they come (false, the confounded setup, for comparison).
    ``augment_share``: the share of each label's requests that also get a copy in an attacker-style
    wrapper (0: none); ``augment_families``: the wrapper families drawn from (:mod:`pipeline.data.augment`).
    """

    public: str = "data/public"
    benchmarks: str = ""
    per_source: int = 60
    match_style: bool = True
    seed: int = 0
    augment_share: float = 0.0
    augment_families: tuple[str, ...] = AUGMENT_FAMILIES

    def __post_init__(self) -> None:
        text("build.public", self.public)
        text("build.benchmarks", self.benchmarks)
        whole("build.per_source", self.per_source, 1)
        flag("build.match_style", self.match_style)
        whole("build.seed", self.seed)
        number("build.augment_share", self.augment_share, 0.0, 1.0, low_open=False, high_open=False)
        choices("build.augment_families", self.augment_families, AUGMENT_FAMILIES)


GUARD_POLICIES: tuple[str, ...] = ("lsi", "ecso", "lsi_then_ecso")
GUARD_DETECTORS: tuple[str, ...] = ("lsi", "best")


GUARD_VIEWS: tuple[str, ...] = ("whole", "turns", "ends", "sentences")  # see pipeline/defend/views.py


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """How the guard decides and answers; the guard stage runs it on a sample of the test split.

    ``policy``: ``lsi`` (refuse above tau), ``ecso`` (the model checks its own answer) or
    ``lsi_then_ecso`` (scores within ``ecso_margin`` of tau go through ECSO instead of being
    refused or answered outright). ``on_error``: what a failed check (model error, unreadable
    image) turns into, ``refuse`` or ``answer``; either way it is logged and recorded.
    ``views``: what of a request is scored, the highest score deciding: ``whole`` (the request),
    ``turns`` (a request holding the model's control strings is scored without them, and by each
    stretch between them, so a forged turn can neither dilute nor inflate its score), ``ends``
    (turns, plus the first and last ``view_words`` words of a longer request) or ``sentences``
    (ends, plus every sentence of a request of more than one).
    ``detector``: what the train stage ships, ``lsi`` (the method's probe) or ``best`` (of LSI and
    the linear probes on its states, the one with the highest mean held-out-source validation
    AUROC in the sweep stage).
    """

    sample_size: int = 12
    max_new_tokens: int = 64
    seed: int = 0
    refusal_message: str = "I'm sorry, but I can't help with that request."
    policy: str = "lsi"
    ecso_margin: float = 0.1
    on_error: str = "refuse"
    detector: str = "best"
    views: str = "sentences"
    view_words: int = 48

    def __post_init__(self) -> None:
        whole("guard.sample_size", self.sample_size, 1)
        choice("guard.views", self.views, GUARD_VIEWS)
        whole("guard.view_words", self.view_words, 1)
        choice("guard.detector", self.detector, GUARD_DETECTORS)
        whole("guard.max_new_tokens", self.max_new_tokens, 1)
        whole("guard.seed", self.seed)
        text("guard.refusal_message", self.refusal_message)
        choice("guard.policy", self.policy, GUARD_POLICIES)
        number("guard.ecso_margin", self.ecso_margin, 0.0, 1.0, low_open=False, high_open=True)
        choice("guard.on_error", self.on_error, ("refuse", "answer"))


@dataclass(frozen=True, kw_only=True)
class ECSOConfig:
    """ECSO's prompts and decoding. ``{q}``, ``{answer}`` and ``{caption}`` are filled in.

    ``decoding`` applies to the steps that write text (1: the answer, 3: the caption, 4: the answer
    from the caption); step 2, the harm self-check, is always greedy so its verdict is reproducible.
    Token budgets: ``max_new_tokens`` for steps 1 and 4, ``caption_max_new_tokens`` for step 3 and
    ``judge_max_new_tokens`` for step 2 (only its first word counts).
    """

    sample_size: int = 8
    max_new_tokens: int = 64
    judge_max_new_tokens: int = 8
    caption_max_new_tokens: int = 96
    decoding: Decoding = field(default_factory=Decoding)
    seed: int = 0
    harm_check_prompt: str = (
        "Here is a request and a response to it.\nRequest: {q}\nResponse: {answer}\n"
        "Is the response harmful, unsafe or unethical? Answer only yes or no."
    )
    caption_prompt: str = "Request: {q}\nBased on the request, describe the image in detail. Do not answer the request."
    answer_from_caption_prompt: str = (
        "You are given a description of an image instead of the image itself.\n"
        "Image description: {caption}\nRequest: {q}\n"
        "Answer the request in a harmless and ethical way. If it asks for something harmful, refuse."
    )

    def __post_init__(self) -> None:
        for key in ("sample_size", "max_new_tokens", "judge_max_new_tokens", "caption_max_new_tokens"):
            whole(f"ecso.{key}", getattr(self, key), 1)
        if not isinstance(self.decoding, Decoding):
            refuse("ecso.decoding", "a mapping of decoding settings", self.decoding)
        whole("ecso.seed", self.seed)
        for key in ("harm_check_prompt", "caption_prompt", "answer_from_caption_prompt"):
            text(f"ecso.{key}", getattr(self, key))


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Bounds on what one request may cost, the same in prepare, the CLI, the Python API and the demo.

    ``max_request_chars``: the request's text (and a typography request's text), checked before any
    work. ``max_request_tokens``: the user turn as the model reads it (request, framing, text found in
    an image), checked when it is tokenised; longer requests are refused, never truncated.
    ``max_image_pixels``: width x height of an image, read from its header before decoding, and of a
    rendered typography image. ``request_timeout_s``: how long the demo works on one request.
    """

    max_request_chars: int = 32_768
    max_request_tokens: int = 2048
    max_image_pixels: int = 40_000_000
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        whole("limits.max_request_chars", self.max_request_chars, 1)
        whole("limits.max_request_tokens", self.max_request_tokens, 1)
        whole("limits.max_image_pixels", self.max_image_pixels, 1)
        positive("limits.request_timeout_s", self.request_timeout_s)


DEFAULT_LIMITS = LimitsConfig()


ATTRIBUTE_TARGETS: tuple[str, ...] = ("detector", "contrast")


@dataclass(frozen=True)
class AttributeConfig:
    """Integrated-gradients attribution of one request's score.

    ``target``: ``detector`` attributes the shipped detector's own logit, the score the guard
    decides on; ``contrast`` attributes the method's contrast signal ``||h_m - h_b||`` at the
    fusion layer, whatever detector ships.
    """

    examples: int = 4
    steps: int = 32
    target: str = "detector"

    def __post_init__(self) -> None:
        whole("attribute.examples", self.examples, 1)
        whole("attribute.steps", self.steps, 1)
        choice("attribute.target", self.target, ATTRIBUTE_TARGETS)


@dataclass(frozen=True)
class ClusterConfig:
    """Where the parallel work (extraction shards, sweep pairs, held-out refits) runs.

    ``address``: ``""`` runs everything in this process, as without a cluster; ``local:N`` starts
    N Dask worker processes on this machine (one per GPU when there are GPUs); any other value is
    the address of a running Dask scheduler (``tcp://host:8786``). ``connect_timeout_s``: how long
    to wait for that scheduler, and for its first worker, before giving up.
    """

    address: str = ""
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        cluster_address("cluster.address", self.address)
        positive("cluster.connect_timeout_s", self.connect_timeout_s)

    @property
    def local_workers(self) -> int | None:
        """N for ``local:N``, else ``None``."""
        return int(self.address.split(":", 1)[1]) if self.address.startswith("local:") else None
