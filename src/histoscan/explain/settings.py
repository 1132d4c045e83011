"""Options of ``histoscan explain`` (each field's help text is its ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass

from histoscan.enums import CamMethod, CamScale
from histoscan.errors import ConfigError
from histoscan.options import check_choices, doc

Method = CamMethod
Scale = CamScale


@dataclass
class ExplainSettings:
    """What to explain, how, and where the pictures go."""

    run_dir: str = doc("A run folder with best.safetensors (Grad-CAM needs the weights).", argument=True, metavar="RUN")
    out: str = doc("Folder for the PNGs, explain.csv, explain.html (and maps/ with --save-maps).", "explain")
    method: Method = doc(
        "CAM method (pytorch-grad-cam); auto: HiResCAM where the head flattens, LayerCAM with --finer, else Grad-CAM.",
        "auto",
    )
    target: str = doc(
        "Class whose evidence is mapped: tumour (the positive class), predicted, or a class name.", "tumour"
    )
    tta: bool | None = doc(
        "Average the maps of the 8 flips/rotations (each turned back) and the probabilities "
        "(default: off, histoscan.inference.tta's default for explaining).",
        None,
        cli=False,
    )
    save_maps: bool = doc("Also write each raw map as maps/<id>.npy (float32, one scale across images).", False)
    scale: Scale = doc(
        "Colour scale of the pictures: global (one scale across images) or image (each its own max).", "global"
    )
    split: str | None = doc("For a store: test, val, train or all (as 'histoscan evaluate').", None)
    ids: str | None = doc("Only these ids: comma-separated, or a file with one id per line.", None)
    labels: str | None = doc("An id,label CSV giving the true labels of image files (a store has its own).", None)
    layer: str | None = doc("A layer name to read instead of the one chosen from the model's structure.", None)
    finer: bool = doc(
        "Read the stage before the last one (twice the resolution: 6 x 6 instead of 3 x 3 for a timm CNN at "
        "96 px), with LayerCAM unless --method names another.",
        False,
    )
    slow_seconds: float = doc(
        "Warn when one map takes longer than this (seconds, measured on a first blank image).", 2.0, cli=False
    )
    device: str = doc("Torch device (cpu, cuda, mps).", "cpu", cli=False)
    batch_size: int = doc("Images per forward/backward pass.", 32, cli=False)
    workers: int | None = doc("Workers reading and decoding the inputs in parallel (default: one per core).", None)
    gallery_limit: int = doc("Most pictures per group in explain.html (the most confident first).", 100)
    force: bool = doc("Write into an existing non-empty --out folder.", False)

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("batch_size", "gallery_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"explain option {name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
