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
+ (classes + 1 + the modules of 3 edge layers) calibration passes + 1 for the
calibration's predicted errors (sensitivity.py); with the defaults, 8 classes and 7
modules per layer, 80 reads.

`weighted` is the budget's objective where the numpy model cannot run (MoE,
hybrid and GGUF sources) but an imatrix gives the moments: the same predicted
output errors E||(W - W_hat) x||^2, with the weight objective's class priors as
the class gains. Why priors and not a neutral gain: the errors are in each
module's own output units, and what one unit costs the logits depends on where
the module writes (a value or down projection straight into the residual
stream, a key through a softmax): without a calibration pass the priors are the
only estimate of that ordering we have, and they are the same numbers the weight
objective already trusts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import moments as moments_mod
from .allocate import budget_settings, build_units
from .manifest import Manifest
from .mlx_names import NameMap, build_name_map, checkpoint_shapes
from .npmodel import NpModel
from .recipe import Recipe
from .sensitivity import Sensitivity, calibrate, candidate_errors
from .sources.checkpoint import Checkpoint, open_checkpoint


def measure(model_dir: str | Path, manifest: Manifest, recipe: Recipe,
            moments: dict[str, np.ndarray] | None = None, *, progress: bool = False,
            name_map: NameMap | None = None,
            options: moments_mod.MomentOptions = moments_mod.DEFAULT_OPTIONS,
            weights: Checkpoint | None = None,
            fold: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
            model_and_tokenizer: tuple[NpModel, object] | None = None,
            ) -> tuple[Sensitivity, dict[str, np.ndarray]]:
    """(sensitivity for the budget recipe, the input moments it used).

    weights: the checkpoint that will be quantized when it is not model_dir's own
    weights (a pre-scaled view, folded.py); `fold` maps the float model's moments to
    the ones its modules see (d / s^2). Calibration runs on the float model and its
    own moments (the folded model computes the same function). The model is streamed
    from model_dir unless the caller passes one (e.g. NpModel.load's)."""
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
    seen = fold(own) if fold is not None else own
    errors = candidate_errors(weights or ckpt, name_map, seen, settings, progress=progress)
    class_of = {u.module: u.tensor_class for u in units if u.module in settings}
    gains, module_gains = calibrate(model, sequences, name_map, own, class_of)
    return Sensitivity(errors=errors, class_gain=gains, moments_source=source,
                       module_gain=module_gains), seen


def weighted(ckpt, manifest: Manifest, recipe: Recipe, name_map: NameMap,
             moments: dict[str, np.ndarray], tied_embeddings: bool = False, *,
             progress: bool = False) -> Sensitivity:
    """Sensitivity from given moments alone (no forward pass): see the module doc.
    Modules the moments miss are measured with flat moments at the median level of
    the given ones, so their errors stay on the same scale."""
    units = build_units(manifest, name_map, recipe)
    settings = budget_settings(units, recipe)
    level = float(np.median([float(np.mean(v)) for v in moments.values()])) if moments else 1.0
    filled = dict(moments)
    for t in name_map.quantizable():
        for src in t.sources:
            if src not in filled:
                filled[src] = np.full(t.shape[-1], level, np.float32)
    errors = candidate_errors(ckpt, name_map, filled, settings, progress=progress)
    budget = recipe.budget
    gains = {u.tensor_class: budget.class_prior.get(u.tensor_class, budget.default_prior)
             for u in units}
    if tied_embeddings and "embedding" in gains:  # the embedding is the output head too
        gains["embedding"] = max(gains["embedding"],
                                 budget.class_prior.get("lm_head", budget.default_prior))
    return Sensitivity(errors=errors, class_gain=gains, moments_source="imatrix")
