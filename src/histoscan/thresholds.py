"""Every blank / dark / tissue threshold of histoscan, in one place.

Four parts decide whether pixels or patches are background, too dark, or tissue, each on the scale of the
statistic it computes (so the numbers differ, but each is written once, here, beside its siblings):

- ``eda``: per-patch grey-level statistics (0-255) count blank, dark and blurry patches of a store;
- ``stain``: per-pixel optical density picks the pixels a stain estimate is made from;
- ``wsi``: per-pixel HSV saturation and value make a slide's tissue mask;
- ``trust``: the tissue check's statistics (``rules.tissue.FEATURE_NAMES``) name why a patch is not tissue.

Change a value here and every consumer, its report text included, follows. Imports nothing (bottom layer).
"""

from __future__ import annotations

# ---- eda: grey level of a patch, 0-255 (eda.stats.PatchStats) -------------------------------------
#: blank: near-white background, bright (mean grey at least this) ...
BLANK_MEAN = 220.0
#: ... and flat (grey standard deviation at most this)
BLANK_STD = 20.0
#: dark: mean grey at most this
DARK_MEAN = 60.0
#: blurry: variance of the Laplacian below this (and not blank)
BLURRY_SHARPNESS = 50.0

# ---- stain: optical density of a pixel (stain.estimate) -------------------------------------------
#: optical density below which a pixel is background in every channel (Macenko et al. 2009: 0.15)
OD_BACKGROUND = 0.15
#: optical density above which a pixel is too dark to measure in every channel (max intensity below 20 of 255)
OD_DARK = 2.5
#: fewest tissue pixels (as a fraction of the sampled pixels) a stain estimate needs
MIN_TISSUE_FRACTION = 0.05

# ---- wsi: a slide's tissue mask, HSV of a thumbnail pixel (wsi.tissue) ----------------------------
#: glass is below this saturation whatever Otsu says (a blank slide has no tissue, not noise)
MIN_SATURATION = 0.05
#: slide edges, black marker and folds darker than this value (HSV V, 0-1) are not tissue
DARK_VALUE = 0.2
#: specks smaller than this (~70 x 70 um) are dust, not tissue
MIN_OBJECT_UM2 = 5_000.0

# ---- trust: the tissue check's statistics of a patch (rules.tissue) -------------------------------
#: a pixel is tissue when its optical density summed over the channels is above this
TISSUE_OD = 0.3
#: a pixel is stained (for the DAB-brown statistic) when its summed optical density is above this
STAINED_OD = 0.6
#: flag ``dark``: mean grey level (0-1) below this
FLAG_DARK_GREY = 0.15
#: flag ``blank``: fraction of tissue pixels below this
FLAG_BLANK_TISSUE = 0.05
#: flag ``uniform``: grey standard deviation (0-1) below this
FLAG_UNIFORM_CONTRAST = 0.01
#: flag ``grayscale``: mean chroma (max - min over the channels, 0-1) below this; faded H&E keeps some
FLAG_GRAYSCALE_CHROMA = 0.002
#: flag ``noise``: contrast kept after 4x4 pooling, relative to the contrast, below this (white noise keeps ~1/4)
FLAG_NOISE_SMOOTHNESS = 0.35
