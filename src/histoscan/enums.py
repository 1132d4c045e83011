"""Every closed vocabulary of histoscan, defined once.

The CLI, the settings dataclasses and the ``model.json`` schema all take their allowed values from here.

Each vocabulary is a ``Literal`` alias (what type checkers, pydantic, the option generator in
``histoscan.options`` and Typer read) and, where code checks a value at run time, a tuple of its values
made from the alias with ``values`` (so the two can never disagree). ``Literal`` rather than ``StrEnum``:
the package supports Python 3.10, and plain strings keep ``model.json`` and YAML configs as they are.

To add a value, add it to the alias: every option, config check and schema that uses it follows. This module
imports nothing from histoscan (it sits at the bottom layer, beside ``errors``).
"""

from __future__ import annotations

from typing import Any, Literal, get_args


def values(alias: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` alias, in the order written (the order error messages list them in)."""
    return tuple(str(v) for v in get_args(alias))


# ---- data ----------------------------------------------------------------------------------------
#: how an image of another size is brought to a store's / model's size (``data.imageio.fit_to_size``)
FitPolicy = Literal["pad-edges", "resize"]
FIT_POLICIES: tuple[FitPolicy, ...] = get_args(FitPolicy)

# ---- stain ---------------------------------------------------------------------------------------
#: stain normalisation methods (``stain.normalise``; ``preprocessing.stain.method`` in model.json)
StainMethod = Literal["reinhard", "macenko"]
STAIN_METHODS: tuple[StainMethod, ...] = get_args(StainMethod)
#: training's ``--stain``: a method, or none
StainChoice = Literal["none", "reinhard", "macenko"]
#: one stain estimate per patch, or per group (patient / slide)
StainGranularity = Literal["patch", "group"]

# ---- training ------------------------------------------------------------------------------------
#: augmentation presets (``data.transforms.build_augmentation``)
AugmentPreset = Literal["none", "flips", "light", "strong", "stain-light", "stain-medium", "stain-strong"]
AUGMENT_PRESETS: tuple[AugmentPreset, ...] = get_args(AugmentPreset)
Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["cosine", "onecycle", "plateau", "constant"]
#: Lightning's precision vocabulary (training only; inference uses ``Precision``)
TrainPrecision = Literal["auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]

# ---- inference -----------------------------------------------------------------------------------
#: inference backends; auto: ONNX when the run has model.onnx, else torch
Backend = Literal["auto", "torch", "onnx"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "auto")  # the order error messages have always listed
#: a precision a model can be stored to run in (``inference.precision`` in model.json)
StoredPrecision = Literal["fp32", "bf16", "fp16"]
#: the torch backend's precision: a stored one, or auto (model.json's, else bf16 where the hardware has it)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
#: what a prediction is for: each use has its default TTA views (``histoscan.inference.tta.default_views``)
TtaUse = Literal["predict", "submission", "evaluate", "fit", "slide", "explain"]  # the HTTP service: predict
TTA_USES: tuple[TtaUse, ...] = get_args(TtaUse)

# ---- trust ---------------------------------------------------------------------------------------
#: what a referral rule ranks images by (``trust.referral``)
ReferBy = Literal["probability", "uncertainty"]
#: ``calibrate --refer-by``: one of ``ReferBy``, or auto (the one that detects errors best)
ReferByChoice = Literal["auto", "probability", "uncertainty"]
REFER_BY: tuple[ReferByChoice, ...] = get_args(ReferByChoice)
#: what a referral rule was asked to reach (sensitivity: among the answered tumour images)
ReferralAsk = Literal["coverage", "accuracy", "sensitivity"]
#: how a referral rule's limit was chosen: the empirical quantile (a coverage), or Learn-then-Test (a target)
ReferralMethod = Literal["empirical", "learn-then-test"]

# ---- tuning --------------------------------------------------------------------------------------
Sampler = Literal["tpe", "random"]
Pruner = Literal["hyperband", "median", "none"]

# ---- explain -------------------------------------------------------------------------------------
#: colour scale of explanation pictures: one across images, or each image its own
CamScale = Literal["global", "image"]
#: what deleted pixels are filled with in the deletion (faithfulness) test
DeletionFill = Literal["grey", "blur", "normal"]
#: CAM methods (pytorch-grad-cam; ``explain.cam`` maps each to its class)
CamMethod = Literal[
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "layercam",
    "gradcam-elementwise",
    "eigencam",
    "eigengradcam",
    "scorecam",
]
CAM_METHODS: tuple[CamMethod, ...] = get_args(CamMethod)
