"""The model bundle: the Python side of a run folder's ``model.json`` and ``best.safetensors``.

``read_bundle`` and ``load_model`` are the public API; the file names and the ``model.json``
schema belong to ``histoscan.runfolder``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from histoscan import __version__
from histoscan.errors import ConfigError, HistoscanError
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import (  # noqa: F401  (file names re-exported for modules that still import them here)
    CONFIG_FILE,
    LAST_CKPT,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_FORMAT,
    SCHEMA_VERSION,
    SPLIT_FILE,
    WEIGHTS_FILE,
    Calibration,
    EnsembleDocument,
    InferencePolicy,
    ModelDocument,
    PreprocessingSpec,
    RunFolder,
    TrustPolicy,
    member_dir,
    parse_model,
    training_store,
)


@dataclass
class ModelBundle:
    """What ``model.json`` says about a trained model: the working object built from its validated document.

    ``histoscan.runfolder.ModelDocument`` is the one description of the file; this view holds its fields
    under the same names (``to_document`` / ``from_document`` convert by name, see ``_same_fields``), except
    ``preprocessing`` (a ``Preprocessing``, which also runs it) and ``temperature`` (``calibration.temperature``).
    A field added to the schema is added here under the same name (``tests/test_bundle_schema.py`` checks).
    """

    architecture: str
    classes: list[str]
    preprocessing: Preprocessing
    model_args: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5
    temperature: float = 1.0
    best_metric: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    histoscan_version: str = __version__
    inference: InferencePolicy = field(default_factory=InferencePolicy)
    trust: TrustPolicy = field(default_factory=TrustPolicy)

    @property
    def task(self) -> str:
        """``binary`` for two classes (one output logit), else ``multiclass``."""
        return "binary" if len(self.classes) == 2 else "multiclass"

    @property
    def num_outputs(self) -> int:
        """Width of the model's output: 1 logit for binary tasks, one per class otherwise."""
        return 1 if self.task == "binary" else len(self.classes)

    @property
    def training_store(self) -> Path | None:
        """The store the model trained on (None when model.json names none)."""
        return training_store(self.training)

    def to_document(self, source: str | Path = MODEL_FILE) -> ModelDocument:
        """The ``model.json`` document (current schema), validated (ConfigError naming ``source``).

        Field by field by name (``_same_fields``): only the two that differ in shape are spelt out.
        """
        pre = asdict(self.preprocessing)
        data = {name: _plain(getattr(self, name)) for name in _same_fields()}
        data.update(
            format=MODEL_FORMAT,
            schema_version=SCHEMA_VERSION,
            kind="model",
            preprocessing={name: pre[name] for name in PreprocessingSpec.model_fields},
            calibration={"temperature": self.temperature},
        )
        return parse_model(data, str(source))

    def to_dict(self) -> dict[str, Any]:
        """``model.json`` as a plain dict."""
        return self.to_document().model_dump(mode="json")

    @classmethod
    def from_document(cls, doc: ModelDocument) -> ModelBundle:
        """The bundle a validated ``model.json`` describes."""
        same = {name: _copy(getattr(doc, name)) for name in _same_fields()}
        return cls(
            preprocessing=Preprocessing(**doc.preprocessing.model_dump()),
            temperature=doc.calibration.temperature,
            **same,
        )

    @classmethod
    def from_dict(cls, d: object, source: str = MODEL_FILE) -> ModelBundle:
        """Validate a decoded ``model.json`` (any schema version) and build the bundle."""
        return cls.from_document(parse_model(d, source))

    def save(self, run_dir: str | Path) -> Path:
        """Write ``model.json`` atomically."""
        run = RunFolder(run_dir)
        return run.write_model_json(self.to_document(run.model_json))


def _same_fields() -> tuple[str, ...]:
    """The fields ``ModelBundle`` carries exactly as ``model.json`` (``ModelDocument``) has them.

    That is all but ``preprocessing`` (a ``Preprocessing``, built from its spec) and ``temperature``
    (``calibration.temperature``).
    """
    return tuple(
        f.name for f in fields(ModelBundle) if f.name in ModelDocument.model_fields and f.name != "preprocessing"
    )


def _plain(value: Any) -> Any:
    """A field's value as JSON-like data (a pydantic part dumped, lists and dicts copied)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return type(value)(value) if isinstance(value, (list, dict)) else value


def _copy(value: Any) -> Any:
    """A document's value for a bundle: lists and dicts copied (pydantic parts shared, as the bundle edits them)."""
    return type(value)(value) if isinstance(value, (list, dict)) else value


@dataclass
class EnsembleBundle(ModelBundle):
    """An ensemble's view as one model: its classes, threshold, temperature and policies, and its members.

    ``preprocessing`` is the members' shared geometry (image size, fit policy, resolution, label size: the
    first member's, which ``histoscan ensemble`` checked every member agrees with); each member still applies
    its own crop, resize, normalisation and stain target, read from its own ``model.json``.
    """

    members: list[ModelBundle] = field(default_factory=list)
    member_dirs: list[Path] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    document: EnsembleDocument | None = None

    @property
    def fitted_on(self) -> str:
        """Which predictions the ensemble's threshold and temperature were fitted on.

        ``calibration`` (its split's calibration rows), ``oof`` (the members are the folds of one
        cross-validation: single-member out-of-fold scores) or ``validation`` (older ensembles).
        """
        return self.document.fitted_on if self.document else "validation"

    def to_ensemble_document(self) -> EnsembleDocument:
        """The ensemble's ``model.json`` with this view's threshold, temperature and policies."""
        if self.document is None:
            raise ConfigError("an ensemble bundle needs its model.json document to be saved")
        return self.document.model_copy(
            update={
                "threshold": self.threshold,
                "calibration": Calibration(temperature=self.temperature),
                "inference": self.inference,
                "trust": self.trust,
            }
        )

    def save(self, run_dir: str | Path) -> Path:
        """Write the ensemble's ``model.json`` atomically (the members' files are never touched)."""
        return RunFolder(run_dir).write_model_json(self.to_ensemble_document())

    def to_dict(self) -> dict[str, Any]:
        """The ensemble's model.json document as a JSON-ready dict."""
        return self.to_ensemble_document().model_dump(mode="json")

    @classmethod
    def from_ensemble(cls, doc: EnsembleDocument, ensemble_dir: str | Path) -> EnsembleBundle:
        """The view of an ensemble's validated ``model.json``, reading each member's bundle (one line per bad member)."""
        dirs = [member_dir(ensemble_dir, m.run) for m in doc.members]
        members = [read_member(d, Path(ensemble_dir)) for d in dirs]
        first = members[0]
        return cls(
            architecture="ensemble",
            classes=list(doc.classes),
            preprocessing=first.preprocessing,
            threshold=doc.threshold,
            temperature=doc.calibration.temperature,
            best_metric={},
            split={"file": SPLIT_FILE, "fitted_on": doc.fitted_on},
            training={"store": first.training.get("store"), "members": len(members)},
            histoscan_version=doc.histoscan_version,
            inference=doc.inference,
            trust=doc.trust,
            members=members,
            member_dirs=dirs,
            weights=[m.weight for m in doc.members],
            document=doc,
        )


def read_member(run_dir: Path, ensemble_dir: Path | None = None) -> ModelBundle:
    """One member's bundle of an ensemble.

    One member's bundle; ConfigError naming the member (and the ensemble, when there is one yet) when it is
    missing or is itself an ensemble.
    """
    run = RunFolder(run_dir)
    where = f"{ensemble_dir}: " if ensemble_dir is not None else ""
    if not run.model_json.is_file():
        raise ConfigError(f"{where}member {run_dir} is not a histoscan run (no {MODEL_FILE})")
    doc = run.read_document()
    if isinstance(doc, EnsembleDocument):
        raise ConfigError(
            f"{where}member {run_dir} is itself an ensemble; list its members instead (no nested ensembles)"
        )
    return ModelBundle.from_document(doc)


def read_bundle(run_dir: str | Path) -> ModelBundle:
    """Read and validate ``model.json`` of a run folder: a ``ModelBundle``, or an ``EnsembleBundle`` for an ensemble."""
    doc = RunFolder(run_dir).read_document()
    if isinstance(doc, EnsembleDocument):
        return EnsembleBundle.from_ensemble(doc, run_dir)
    return ModelBundle.from_document(doc)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Weights only, as safetensors (no pickle), written atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "histoscan_version": __version__})
    os.replace(tmp, p)
    return p


def build_model(bundle: ModelBundle, source: str | Path = MODEL_FILE) -> nn.Module:
    """The untrained network ``model.json`` describes; ConfigError naming ``source`` when it cannot be built."""
    from histoscan.models import create_model

    try:
        return create_model(
            bundle.architecture,
            len(bundle.classes),
            input_size=bundle.preprocessing.input_size,
            **bundle.model_args,
        )
    except (HistoscanError, TypeError, ValueError, RuntimeError) as exc:  # timm raises the builtin kinds
        raise ConfigError(
            f"{source}: architecture {bundle.architecture!r} with model_args {bundle.model_args} "
            f"cannot be built: {first_line(exc)}"
        ) from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; ConfigError naming it when it is missing, truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p.parent}: no {p.name} (did training finish an epoch?)")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{p}: not a readable safetensors file ({first_line(exc)})") from None


def check_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, bundle: ModelBundle) -> None:
    """ConfigError naming ``path`` unless ``state`` has exactly the model's tensors at the model's shapes.

    A classifier of another width gets its own message: model.json's classes do not match the weights.
    """
    own = model.state_dict()
    head = _classifier_names(model)
    for name, tensor in own.items():
        if name not in state:
            raise ConfigError(f"{path}: no tensor {name!r}, which {bundle.architecture} needs")
        got, want = tuple(state[name].shape), tuple(tensor.shape)
        if got == want:
            continue
        if name in head and got[:1] != want[:1]:
            raise ConfigError(
                f"{path}: the weights give {got[0]} output(s), but the {len(bundle.classes)} classes in "
                f"{MODEL_FILE} ({', '.join(bundle.classes)}) need {bundle.num_outputs}"
            )
        raise ConfigError(f"{path}: tensor {name!r} has shape {list(got)}; {bundle.architecture} needs {list(want)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise ConfigError(f"{path}: tensor {extra[0]!r} is not part of {bundle.architecture} ({len(extra)} such)")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelBundle]:
    """Rebuild the model of a run folder from the folder alone, in eval mode.

    Every lie is one ConfigError line naming the file: a model.json that fails its schema, model_args the
    architecture does not take, unreadable weights, or weights of another shape (such as classes that
    do not match the model's output width).
    """
    run = RunFolder(run_dir)
    bundle = ModelBundle.from_document(run.read_model_json())  # an ensemble: one line saying to use a member
    model = build_model(bundle, run.model_json)
    state = read_weights(run.weights_path)
    check_state(model, state, run.weights_path, bundle)
    model.load_state_dict(state)
    return model.to(device).eval(), bundle


def _classifier_names(model: nn.Module) -> set[str]:
    """State-dict names of the final classifier's tensors (empty when the model exposes none)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return {name for name, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
