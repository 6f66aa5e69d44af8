"""scikit-learn's own estimator checks on every detector (``parametrize_with_checks``).

The linear detectors pass every check. LSI reads ``[h_s, delta_h]`` side by side, so the checks
that fit on an odd number of columns cannot apply to it; each is listed with its reason and
expected to fail (strictly: one that starts passing fails here, so the list stays true).
"""

from __future__ import annotations

from collections.abc import Callable

from sklearn.base import BaseEstimator
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.detect.detector import LINEAR_DETECTORS, LinearDetector, LSIDetector, pieces_for

# One stored layer: every recipe reads the same states, and logreg_hs_delta reads two pieces.
LINEAR = [LinearDetector(name, pieces_for(name, (0,), 0, 0, plain_layer=0)) for name in LINEAR_DETECTORS]
# Few epochs and a large step keep training to a fraction of a second and still fit the checks' blobs.
LSI = LSIDetector(fusion_layer=0, safety_layer=0, epochs=5, lr=0.1, alpha=1.0, init_gain=1.0, batch_size=32)

ODD_WIDTH = "the check fits X of {width} columns; LSI's X is [h_s, delta_h] side by side, an even width"
LSI_EXPECTED_FAILURES = {
    **{
        check: ODD_WIDTH.format(width=3)
        for check in (
            "check_fit_score_takes_y",
            "check_dont_overwrite_parameters",
            "check_pipeline_consistency",
            "check_estimators_nan_inf",
            "check_estimators_pickle",
            "check_f_contiguous_array_estimator",
            "check_supervised_y_2d",
            "check_methods_sample_order_invariance",
            "check_methods_subset_invariance",
            "check_dict_unchanged",
            "check_fit2d_predict1d",
        )
    },
    "check_estimators_dtypes": ODD_WIDTH.format(width=5),
    "check_class_weight_classifiers": (
        "class_weight is TrainConfig's 'none' / 'balanced' (the loss weights of train_probe), not a dict"
    ),
}


def expected_failures(estimator: BaseEstimator) -> dict[str, str]:
    """The checks that cannot apply to ``estimator``, each with its reason."""
    return dict(LSI_EXPECTED_FAILURES) if isinstance(estimator, LSIDetector) else {}


@parametrize_with_checks([*LINEAR, LSI], expected_failed_checks=expected_failures, xfail_strict=True)
def test_detector_is_a_scikit_learn_classifier(
    estimator: BaseEstimator,
    check: Callable[[BaseEstimator], None],
) -> None:
    check(estimator)
