"""The output objective end to end: moments -> candidate output errors -> class gains.

`measure` is what `swan-quant convert` and `swan-serve`'s first load run before
allocating with the budget recipe: it opens the float model streamed from its
checkpoint (npmodel.py: about one decoder layer in float32 at a time), lets it
write its own text (moments.py), measures every candidate's predicted
output error and calibrates the class gains on that text
(sensitivity.py). Moments given by the caller (an imatrix file) replace the
self-generated ones; the self-generated text is still used for calibration.

Weight reads per measure (each a full pass over the checkpoint, the head in
vocabulary blocks): 1 prefill + max_new_tokens decode + 1 recording (moments.py)
+ (classes + 1) calibration passes + 1 for the calibration's predicted errors
(sensitivity.py); with the defaults and 8 classes, 59 reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import moments as moments_mod
from .allocate import budget_settings, build_units
from .manifest import Manifest
from .mlx_names import NameMap, build_name_map, checkpoint_shapes
from .npmodel import NpModel
from .recipe import Recipe
from .sensitivity import Sensitivity, calibrate, candidate_errors
from .sources.checkpoint import open_checkpoint


def measure(model_dir: str | Path, manifest: Manifest, recipe: Recipe,
            moments: dict[str, np.ndarray] | None = None, *, progress: bool = False,
            name_map: NameMap | None = None,
            options: moments_mod.MomentOptions = moments_mod.DEFAULT_OPTIONS,
            model_and_tokenizer: tuple[NpModel, object] | None = None,
            ) -> tuple[Sensitivity, dict[str, np.ndarray]]:
    """(sensitivity for the budget recipe, the input moments it used). The model is
    streamed from model_dir unless the caller passes one (e.g. NpModel.load's)."""
    ckpt = open_checkpoint(model_dir)
    name_map = name_map or build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    model, tokenizer = model_and_tokenizer or NpModel.stream(model_dir)
    own, sequences = moments_mod.self_generated(model_dir, options,
                                               model_and_tokenizer=(model, tokenizer))
    source = "self-generated"
    if moments is not None:
        own = {**own, **{k: np.asarray(v, np.float32) for k, v in moments.items()}}
        source = "given"
    units = build_units(manifest, name_map, recipe)
    settings = budget_settings(units, recipe)
    errors = candidate_errors(ckpt, name_map, own, settings, progress=progress)
    class_of = {u.module: u.tensor_class for u in units if u.module in settings}
    gains = calibrate(model, sequences, name_map, own, class_of)
    return Sensitivity(errors=errors, class_gain=gains, moments_source=source), own
