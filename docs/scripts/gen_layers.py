"""Write the layers page (concepts/layers.md) from the import-linter contracts in pyproject.toml.

The diagram is the contract itself (``[[tool.importlinter.contracts]]`` of type ``layers``), so the page
cannot say one thing while CI enforces another. Where a checkout has no contract yet, the layers of
DESIGN.md are drawn instead and the page says so. Run by mkdocs-gen-files during ``mkdocs build``;
``python docs/scripts/gen_layers.py`` prints the page.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
PAGE = "concepts/layers.md"

# DESIGN.md's layer list, drawn only when pyproject.toml holds no layers contract
DESIGN_LAYERS = [
    "cli",
    "serving | wsi | tuning",
    "training | explain",
    "evaluation",
    "trust fitting",
    "inference",
    "trust rules",
    "bundle | runfolder",
    "models",
    "preprocessing | stain",
    "data",
    "core: errors, settings and options, progress, io helpers, metrics",
]

CHECK = """## Checking the layers

Imports inside functions count like any other import. Both contracts are *exhaustive* and list no
exceptions: a new top-level module or subpackage of `histoscan` (or of `histoscan.models`) fails the check
until it is given a layer in `pyproject.toml`. From the repository root, with the dev extra installed:

```bash
lint-imports
```

It prints `Contracts: 2 kept, 0 broken.` when the layers hold. An upward import, for example
`histoscan/data/transforms.py` importing `histoscan.stain.augment` inside a function, makes it exit with
status 1 and print:

```text
histoscan layers
----------------

histoscan.data is not allowed to import histoscan.stain:

- histoscan.data.transforms -> histoscan.stain.augment (l.35)
```

Import cycles between the package's units and modules are measured by `benchmarks/import_cycles.py`
(`python benchmarks/import_cycles.py --src src --json cycles.json`, on any source tree): the results
[before the contracts](../benchmarks/import_cycles_before.md) and
[after them](../benchmarks/import_cycles_after.md).

## Where things live

Code that trust rules apply sits low (`histoscan.rules`); code that fits them sits high
(`histoscan.trust`). Paths that moved when the layers were drawn (the old paths no longer exist, since a
re-export from the old place would be an upward import):

| before | now |
| --- | --- |
| `histoscan.evaluation.metrics` | `histoscan.metrics` |
| `histoscan.evaluation.evaluate.pick_threshold`, `THRESHOLD_RULES` | `histoscan.metrics` (still importable from `histoscan.evaluation.evaluate`) |
| `histoscan.data.transforms.build_augmentation`, `build_restain`, `AUGMENTATION_PRESETS` | `histoscan.stain.augment` |
| `histoscan.trust.answers` | `histoscan.rules.answers` |
| `histoscan.trust.referral.refer_mask`, `describe`, `REFER` | `histoscan.rules.referral` (fitting, `fit_referral`, stays in `histoscan.trust.referral`) |
| `histoscan.trust.tissue.tissue_features`, `judge`, `flag`, `check_images`, `answers_for`, `TissueVerdict` | `histoscan.rules.tissue` (fitting, `fit_tissue_check`, `fit_run_tissue_check`, stays in `histoscan.trust.tissue`) |
| `histoscan.models.registry.create_model`, `list_models`, `is_model`, `count_parameters` | `histoscan.models.factory` (and `from histoscan.models import create_model` as before) |

```python
from histoscan.metrics import auroc, pick_threshold
from histoscan.models import create_model, register_model
from histoscan.rules.tissue import check_images
from histoscan.stain.augment import build_augmentation
from histoscan.trust.calibrate import fit_run_referral
from histoscan.trust.tissue import fit_run_tissue_check
```

A model of your own registers as before: decorate its builder with `histoscan.models.register_model` and
`create_model` finds it by name.
"""

WHY = """## Why layers

- **One inference path.** Batch prediction, the HTTP service, slide scanning and evaluation all run the
  `Predictor` of the inference layer, so a fix or a speed-up lands everywhere at once.
- **One copy of preprocessing.** Fit to size, stain normalisation, crop, mean and std live in the
  preprocessing layer and are stored in the [model bundle](bundle.md); training and every consumer read
  them from there.
- **What is fitted is what answers.** Trust rules (a referral band, a tissue check) are *applied* low in
  the stack, by the Predictor; they are *fitted* higher up, on predictions the inference layer made. Every
  fitted quantity in `model.json` records the predictor settings it was fitted under and is applied only
  under those settings.
- **No logic in the CLI.** Everything a command does can be done from Python: the
  [Python API](../reference/python.md) lists the entry points.

Where code seems to need an upward import, it is in the wrong layer: it moves, or the lower layer is
passed a function or a value instead.
"""


def contracts() -> list[dict[str, Any]]:
    """The ``layers`` contracts of pyproject.toml's ``[tool.importlinter]``, in order (empty when none)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = data.get("tool", {}).get("importlinter", {}).get("contracts", [])
    return [c for c in found if c.get("type") == "layers"]


def comments() -> dict[str, str]:
    """The comment after each layer line of pyproject.toml (``"name",  # comment``), by layer."""
    notes: dict[str, str] = {}
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        m = re.match(r'\s*"([^"]+)",\s*#\s*(.+)$', line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def diagram(layers: list[str], prefix: str, notes: dict[str, str]) -> list[str]:
    """A text diagram: one line per layer, top to bottom, siblings joined by a dot."""
    width = max(len(" · ".join(f"{prefix}{p.strip()}" for p in layer.split("|"))) for layer in layers) + 4
    lines = ["```text"]
    for i, layer in enumerate(layers):
        names = " · ".join(f"{prefix}{p.strip()}" for p in layer.split("|"))
        note = notes.get(layer, "")
        lines.append(f"{names:<{width}}{note}".rstrip())
        if i < len(layers) - 1:
            lines.append("  │")
    return [*lines, "```"]


def render() -> str:
    """The whole layers page as Markdown."""
    lines = ["# The layers of the package", ""]
    found = contracts()
    if found:
        notes = comments()
        lines += [
            "histoscan's modules form layers: a module may import from the layers below its own, never from a",
            "layer above. The diagrams below are drawn from the `import-linter` contracts in `pyproject.toml`",
            "(by `docs/scripts/gen_layers.py`, on every build of this site), the same contracts CI checks with",
            "`lint-imports`; modules on one line are siblings and may not import each other either.",
            "",
        ]
        for contract in found:
            containers = contract.get("containers", [])
            prefix = f"{containers[0]}." if containers and containers[0] != "histoscan" else ""
            lines += [f"## {contract.get('name', 'layers')}", ""]
            lines += diagram(list(contract["layers"]), prefix, notes)
            lines.append("")
    else:
        lines += [
            "histoscan's subpackages form layers: a module may import from the layers below its own, never from",
            "a layer above. This checkout's `pyproject.toml` has no `import-linter` contract yet, so the diagram",
            "is the design's list (`DESIGN.md`):",
            "",
            *diagram(DESIGN_LAYERS, "", {}),
            "",
        ]
    lines += [CHECK, WHY] if found else [WHY]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
else:  # run by mkdocs-gen-files
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as fh:
        fh.write(render())
