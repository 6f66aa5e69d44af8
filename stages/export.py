"""DVC stage ``export``: the run's guard as one shareable folder, ``data/guard_bundle/``.

The folder (:mod:`pipeline.defend.bundle`) holds the shipped detector, tau and its calibration, the
prompts, ``guard``, ``ecso`` and ``limits`` settings, the model's identity (kind, name, revision)
and folder, and this stage's run record, with a manifest of every file's sha256. ``dvc push``
shares it; ``lsi-guard check --guard data/guard_bundle`` and ``Guard.from_pretrained`` load it.
The model's identity is read from its folder's metadata: no weights load.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.defend.pretrained import bundle_from_run, write_bundle
from pipeline.layout import GUARD_BUNDLE
from stages import run_record, run_stage

OUT = GUARD_BUNDLE


def main() -> None:
    """Read the run's detector, calibration, settings and model identity; write the folder whole (or not at all)."""
    contents = bundle_from_run(".")
    info = contents.info
    # Saving does its torch work (the detector's tensors) on the CPU.
    contents = replace(contents, run=run_record(info.name, info.revision, "cpu"))
    write_bundle(contents, OUT)
    print(
        f"{OUT}: {contents.detector.describe()}, tau={contents.settings.tau:.4f}; "
        f"{contents.model.kind} model {info.name!r} (revision {info.revision})"
    )


if __name__ == "__main__":
    run_stage(main)
