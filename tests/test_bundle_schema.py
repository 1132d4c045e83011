"""model.json has one description (runfolder's pydantic schema): its JSON Schema export, the migration chain,
and the bundle objects built from it field by field."""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from histoscan.bundle import ModelBundle, _same_fields, read_bundle
from histoscan.bundle_schema import json_schema, main
from histoscan.preprocessing import Preprocessing
from histoscan.runfolder import (
    _UPGRADES,
    SCHEMA_VERSION,
    EnsembleDocument,
    InferencePolicy,
    ModelDocument,
    ReferralRule,
    TrustPolicy,
    migrate,
    parse_document,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _rich_bundle() -> ModelBundle:
    """A bundle using the optional parts: stain target, resolution, label size, TTA policy, referral rule."""
    stain = {
        "method": "macenko",
        "stain_matrix": [[0.65, 0.7, 0.29], [0.07, 0.99, 0.11]],
        "max_concentrations": [2.0, 1.5],
    }
    pre = Preprocessing(image_size=[96, 96], fit="pad-edges", crop=64, mpp=0.5, label_size=32, stain=stain)
    rule = ReferralRule(
        by="probability", band=[0.3, 0.7], tta=[0, 1], asked="coverage", target=0.9, count=100, coverage=0.9,
        accuracy=0.95,
    )  # fmt: skip
    return ModelBundle(
        "simple_cnn",
        ["normal", "tumor"],
        pre,
        model_args={"batch_norm": True},
        threshold=0.4,
        temperature=1.3,
        inference=InferencePolicy(precision="bf16", tta=[0, 4]),
        trust=TrustPolicy(referral=rule),
        training={"store": "/data/store"},
    )


# ---- the exported JSON Schema -------------------------------------------------------------------
def test_the_schema_validates_a_model_json_written_by_save(tmp_path: Path) -> None:
    path = _rich_bundle().save(tmp_path)
    doc = json.loads(path.read_text())
    _validator().validate(doc)
    assert doc["schema_version"] == SCHEMA_VERSION


@pytest.mark.slow
def test_the_schema_validates_the_model_json_of_a_trained_run(tiny_run: Path) -> None:
    _validator().validate(json.loads((tiny_run / "model.json").read_text()))


def test_the_schema_validates_an_ensemble_document() -> None:
    doc = EnsembleDocument(members=[{"run": "a"}, {"run": "b", "weight": 2.0}], classes=["normal", "tumor"])  # type: ignore[list-item]
    _validator().validate(doc.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d.update(threshold=1.5), "threshold"),
        (lambda d: d.update(kind="pipeline"), "kind"),
        (lambda d: d.update(colour="blue"), "colour"),
        (lambda d: d["preprocessing"].update(fit="stretch"), "fit"),
        (lambda d: d["preprocessing"].pop("mean"), "mean"),
        (lambda d: d["inference"].update(precision="int3"), "precision"),
        (lambda d: d["calibration"].update(temperature=0), "temperature"),
    ],
)
def test_the_schema_rejects_what_histoscan_rejects(tmp_path: Path, change: Any, where: str) -> None:
    doc = json.loads(_rich_bundle().save(tmp_path).read_text())
    change(doc)
    assert not _validator().is_valid(doc), where
    with pytest.raises(Exception, match=where):  # histoscan reads it as a ConfigError naming the field
        parse_document(doc)


def test_the_schema_is_written_by_its_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "model.schema.json")]) == 0
    assert json.loads((tmp_path / "model.schema.json").read_text()) == json_schema()
    assert f"schema_version {SCHEMA_VERSION}" in json_schema()["title"]


# ---- the migration chain ------------------------------------------------------------------------
def test_the_chain_has_one_step_per_older_version_and_documents_carry_the_newest() -> None:
    assert sorted(_UPGRADES) == list(range(1, SCHEMA_VERSION))
    for model in (ModelDocument, EnsembleDocument):
        assert model.model_fields["schema_version"].annotation == typing.Literal[SCHEMA_VERSION]
        assert model.model_fields["schema_version"].default == SCHEMA_VERSION


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_every_older_version_migrates_to_the_newest(version: int, tmp_path: Path) -> None:
    example = FIXTURES / f"model-v{version}.json"
    assert example.is_file(), f"add an example of schema version {version} as {example} (runfolder: _UPGRADES)"
    old = json.loads(example.read_text())
    assert old.get("schema_version", 1) == version
    kept = copy.deepcopy(old)
    new = migrate(old, version)
    assert old == kept  # a step never edits the file it reads
    assert new["schema_version"] == SCHEMA_VERSION
    doc = parse_document(new)
    _validator().validate(doc.model_dump(mode="json"))
    # and read from a run folder, saved back, it is the newest version and reads the same
    (tmp_path / "model.json").write_text(example.read_text())
    bundle = read_bundle(tmp_path)
    bundle.save(tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION and read_bundle(tmp_path) == bundle
    _validator().validate(saved)


# ---- the objects built from the schema ----------------------------------------------------------
def test_the_bundle_carries_every_field_of_the_schema_under_its_name() -> None:
    fixed = {"format", "schema_version", "kind"}  # the document fixes them
    shaped = {"preprocessing", "calibration"}  # a Preprocessing, and temperature = calibration.temperature
    assert set(_same_fields()) == set(ModelDocument.model_fields) - fixed - shaped
    assert {f.name for f in dataclasses.fields(ModelBundle)} == set(_same_fields()) | {"preprocessing", "temperature"}
    assert set(ModelDocument.model_fields["calibration"].annotation.model_fields) == {"temperature"}  # type: ignore[union-attr]


def test_a_bundle_round_trips_through_its_document(tmp_path: Path) -> None:
    bundle = ModelBundle.from_document(_rich_bundle().to_document())  # its stain target with the schema's defaults
    again = ModelBundle.from_document(bundle.to_document())
    assert again == bundle
    assert again.model_args is not bundle.model_args and again.classes is not bundle.classes  # copies, not shared
