"""The door between the two rooms: MODEL in, a servable MLX model directory out.

`resolve_or_build` is the one call swan-serve makes: resolve MODEL (hub id or local
directory), serve an MLX checkpoint that is already quantized as it is, and otherwise
return the cached quantized build, making it first on a miss (analyze -> allocate ->
convert -> verify, then an atomic publish). `quantize_model` is that pipeline on its
own; `swan-quant convert` and the bench scripts call the same function.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .cache import ModelCache, entry_key
from .progress import ProgressCallback
from .recipe import DEFAULT_RECIPE, DEFAULT_TARGET_BPW, Recipe, load_recipe
from .sources.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .sources.resolve import ResolvedModel, ResolveError, read_config, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


class BuildError(RuntimeError):
    """The model cannot be quantized or served; the message is one clear line."""


@dataclass(frozen=True)
class BuildOptions:
    # None: 4.5 for budget recipes; a classes recipe (unsloth) is then used as it is,
    # and a target makes it a floor the budget adds bits to.
    target_bpw: float | None = None
    recipe: str = DEFAULT_RECIPE
    q_bits: int | None = None  # classes recipes: the base width d (--q-bits)
    q_group_size: int | None = None  # classes recipes: the base group g (--q-group-size)
    cache_dir: Path | None = None
    rebuild: bool = False
    revision: str | None = None
    analysis_config: str | None = None  # preset name or TOML path; None: swan-default
    gguf_file: str | None = None  # GGUF: which quant of a repo/folder (pattern)
    tokenizer: str | None = None  # GGUF: take the tokenizer from this HF id or folder
    imatrix: str | None = None  # llama.cpp imatrix (GGUF or .dat): input importance
    moments_file: str | None = None  # .npz of input moments (prescale_options.py)
    no_awq: bool = False  # with moments, no AWQ pre-scaling
    equalize: bool = False  # data-free pre-scaling
    extra: dict = field(default_factory=dict)


@dataclass
class PreparedBuild:
    """What `prepare_build` found: the source, and either a servable directory already
    (a cache hit, or an MLX checkpoint served as it is) or the cache entry to build."""

    model: str
    resolved: ResolvedModel
    options: BuildOptions
    ready: Path | None
    key: str = ""
    cache: ModelCache | None = None
    recipe: Recipe | None = None
    identity: dict = field(default_factory=dict)

    def build(
        self,
        on_progress: ProgressCallback | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Path:
        """The servable directory: the ready one, or a fresh build published to the cache."""
        say = log or print
        if self.ready is not None:
            say(f"serving {self.model} from {self.ready}")
            return self.ready
        assert self.cache is not None and self.recipe is not None
        say(f"quantizing {self.model} once into {self.cache.root} (later starts reuse it)")
        source, recipe, options = self.resolved.path, self.recipe, self.options

        def build(tmp: Path) -> None:
            say(f"building {self.model}: analyze, allocate, convert, verify")
            chosen = "keep" if options.recipe == "keep" else recipe
            moments, prescale = _prescale_inputs(options)
            quantize_model(source, tmp, recipe=chosen, target_bpw=options.target_bpw,
                           analysis_config=options.analysis_config, on_progress=on_progress,
                           imatrix=options.imatrix, moments=moments, prescale=prescale,
                           log=say)

        info = {"model": self.model, "revision": self.resolved.revision, **self.identity}
        return self.cache.get_or_build(
            self.resolved.source, self.key, build, info=info, rebuild=options.rebuild,
            log=say, required_bytes=estimated_build_bytes(self.resolved, options.target_bpw),
        )


def prepare_build(model: str, options: BuildOptions | None = None) -> PreparedBuild:
    """Resolve MODEL and check everything that can be checked cheaply, so that a bad
    model fails in a second rather than minutes into a build. Downloads a hub id."""
    options = options or BuildOptions()
    try:
        resolved = resolve_model(model, options.revision, gguf_file=options.gguf_file,
                                 tokenizer=options.tokenizer,
                                 sidecar_root=ModelCache(options.cache_dir).root)
    except ResolveError as exc:
        raise BuildError(str(exc)) from None
    if resolved.is_mlx_quantized:
        return PreparedBuild(model, resolved, options, ready=resolved.path)
    check_buildable(resolved.path)
    recipe = _load_recipe(options.recipe, options.q_bits, options.q_group_size)
    keep = options.recipe == "keep"
    if options.target_bpw is None and recipe.mode != "classes":
        options = replace(options, target_bpw=DEFAULT_TARGET_BPW)
    identity = {
        "recipe": "keep" if keep else recipe.model_dump(mode="json"),
        "target_bpw": None if keep else options.target_bpw,
        "analysis_config": options.analysis_config,
    }
    if options.imatrix is not None:  # a different imatrix is a different build
        identity["imatrix_sha256"] = _input_digest(options.imatrix, "imatrix")
    identity.update(_prescale_identity(options))
    key = entry_key(resolved.source, resolved.revision, identity)
    cache = ModelCache(options.cache_dir)
    hit = None if options.rebuild else cache.lookup(resolved.source, key)
    if hit is None:
        cache.check_free_space(estimated_build_bytes(resolved, options.target_bpw))
    return PreparedBuild(model, resolved, options, hit, key, cache, recipe, identity)


def resolve_or_build(
    model: str,
    options: BuildOptions | None = None,
    on_progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """A local MLX model directory that serves `model`; builds and caches it if needed."""
    return prepare_build(model, options).build(on_progress, log)


def quantize_model(
    model_dir: Path,
    out_dir: Path,
    *,
    recipe: Recipe | str = DEFAULT_RECIPE,
    target_bpw: float | None = None,
    analysis_config: str | None = None,
    manifest_path: Path | None = None,
    force: bool = False,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
    imatrix: str | Path | None = None,
    moments: dict[str, np.ndarray] | None = None,
    prescale: Literal["awq", "equalize"] | None = None,
    log: Callable[[str], None] | None = None,
):
    """analyze -> allocate -> convert -> verify `model_dir` into `out_dir`; returns the
    ConvertResult. A manifest file, when given, replaces the analysis.

    imatrix: a llama.cpp importance matrix; moments: per-input-channel E[x^2] by HF
    weight name (an imatrix's take precedence). They weight the analyzer's error, the
    budget's objective and the group fit; `log` gets the imatrix coverage warning.
    prescale: fold per-channel scales into the weights first (folded.py): "awq" from the
    moments, "equalize" from the weights."""
    from .allocate import build_plan
    from .analyze import analyze_checkpoint
    from .convert import convert
    from .manifest import Manifest
    from .mlx_names import build_name_map, checkpoint_shapes, tied_embeddings
    from .scoring import load_config

    if recipe == "keep" and imatrix is not None:
        raise BuildError("--recipe keep carries the GGUF's own grid over; an imatrix "
                         "has nothing to change there: drop --imatrix")
    if recipe == "keep":  # a GGUF's own grid carried over: no analysis, no budget
        return _keep_model(model_dir, out_dir, force, progress, on_progress)
    recipe = recipe if isinstance(recipe, Recipe) else _load_recipe(recipe)
    base = open_checkpoint(model_dir)
    given = moments  # read first: a file for another model fails before minutes of analysis
    if imatrix is not None:
        name_map = build_name_map(base.config, checkpoint_shapes(base))
        given = {**(moments or {}), **_read_imatrix(imatrix, base, name_map, log)}
    # what is quantized: the source, or its pre-scaled view (folded.py)
    ckpt, fold = _prescaled_source(base, prescale, given, target_bpw, progress)
    moments = fold(given) if given is not None else None  # what the (folded) modules see
    if manifest_path is not None:
        manifest = Manifest.load(manifest_path)
    else:
        manifest = analyze_checkpoint(ckpt, load_config(analysis_config), progress=progress,
                                      on_progress=on_progress, moments=moments)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    sensitivity = None
    from .npmodel import supports

    # The output objective runs the model in numpy (dense Llama-family only for now);
    # other architectures keep the weight objective, and so do GGUF sources for now (the
    # numpy model loads safetensors only).
    runnable = supports(ckpt.config) and any(Path(model_dir).glob("*.safetensors"))
    budgeted = recipe.mode == "budget" or (recipe.mode == "classes" and target_bpw is not None)
    if budgeted and recipe.budget.objective == "output" and runnable:
        from .objective import measure

        sensitivity, moments = measure(model_dir, manifest, recipe, given, progress=progress,
                                       name_map=name_map, weights=ckpt, fold=fold)
    elif budgeted and recipe.budget.objective == "output" and moments:
        from .objective import weighted

        sensitivity = weighted(ckpt, manifest, recipe, name_map, moments,
                               tied_embeddings(ckpt.config), progress=progress)
    mode_errors = None
    if recipe.mode == "budget" and sensitivity is None and set(recipe.budget.modes) - {"affine"}:
        from .sensitivity import relative_mode_errors

        mode_errors = relative_mode_errors(ckpt, name_map, recipe.budget.modes)
    plan = build_plan(manifest, name_map, recipe, target_bpw,
                      tied_embeddings=tied_embeddings(ckpt.config), sensitivity=sensitivity,
                      mode_errors=mode_errors)
    staged_manifest = None
    if manifest_path is None:
        staged_manifest = out_dir.parent / f".{out_dir.name}.manifest.json"
        manifest.save(staged_manifest)
    try:
        result = convert(ckpt, out_dir, plan, force=force, progress=progress,
                         manifest_path=manifest_path or staged_manifest, on_progress=on_progress,
                         moments=moments)
    finally:
        if staged_manifest is not None:
            staged_manifest.unlink(missing_ok=True)
    if ckpt is not base:  # pre-scaled: keep the factors, for swan-quant validate
        from .folded import FOLDS_FILE, save_folds

        save_folds(ckpt, out_dir / FOLDS_FILE)
    verify_generates(out_dir)
    return result


def _read_imatrix(path: str | Path, ckpt, name_map, log: Callable[[str], None] | None
                  ) -> dict:
    import sys

    from .mlx_names import checkpoint_shapes
    from .sources.imatrix import ImatrixError, imatrix_moments

    try:
        found = imatrix_moments(path, ckpt.config, checkpoint_shapes(ckpt), name_map)
    except ImatrixError as exc:
        raise BuildError(str(exc)) from None
    warning = found.warning()
    if warning:
        (log or (lambda m: print(m, file=sys.stderr)))(f"warning: {warning}")
    return found.moments


def _input_digest(path: str, what: str) -> str:
    """A build input file's sha256, for the cache key; one line if it cannot be read."""
    from .cache import file_digest

    try:
        return file_digest(path)
    except OSError as exc:
        raise BuildError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _prescale_inputs(options: BuildOptions) -> tuple[dict | None, str | None]:
    """(moments, prescale method) of the build options."""
    from .prescale_options import MomentsFileError, load_moments_file, prescale_choice

    try:
        moments = load_moments_file(options.moments_file) if options.moments_file else None
    except MomentsFileError as exc:
        raise BuildError(str(exc)) from None
    has_moments = moments is not None or options.imatrix is not None
    return moments, prescale_choice(has_moments, options.no_awq, options.equalize)


def _prescale_identity(options: BuildOptions) -> dict:
    """Cache-key fields for moments and pre-scaling; none when neither is used, so the
    keys of existing builds stay as they were."""
    from .prescale_options import prescale_choice

    out: dict = {}
    if options.moments_file:
        out["moments"] = _input_digest(options.moments_file, "moments file")
    prescale = prescale_choice(bool(options.moments_file or options.imatrix), options.no_awq,
                               options.equalize)
    if prescale:
        out["prescale"] = prescale
    return out


def _prescaled_source(ckpt: Checkpoint, prescale: str | None, moments: dict | None,
                      target_bpw: float | None, progress: bool):
    """(what to quantize: the checkpoint or its folded view, moments -> what the modules
    see)."""
    if prescale is None:
        return ckpt, lambda m: m
    from .folded import describe, fold_moments, prescaled
    from .prescale import setting_for

    if prescale == "awq" and not moments:
        raise BuildError("AWQ pre-scaling needs input moments (an imatrix); "
                         "use --equalize or --no-awq without one")
    if moments and not any(name in ckpt for name in moments):
        raise BuildError("the moments name no weight of this model (made for another model?)")
    view = prescaled(ckpt, prescale, moments, setting_for(target_bpw))
    if progress:
        print(f"{prescale}: {describe(view)}")
    return view, lambda m: fold_moments(m, view)


def _keep_model(model_dir: Path, out_dir: Path, force: bool, progress: bool,
                on_progress: ProgressCallback | None):
    from .convert import convert
    from .mlx_names import build_name_map, checkpoint_shapes
    from .sources.gguf_keep import keep_plan
    from .sources.gguf_source import GGUFCheckpoint

    ckpt = open_checkpoint(model_dir)
    if not isinstance(ckpt, GGUFCheckpoint):
        raise BuildError("--recipe keep needs a GGUF model (it keeps the GGUF's own grid)")
    plan = keep_plan(ckpt, build_name_map(ckpt.config, checkpoint_shapes(ckpt)))
    result = convert(model_dir, out_dir, plan, force=force, progress=progress,
                     on_progress=on_progress)
    verify_generates(out_dir)
    return result


def verify_generates(model_dir: Path) -> None:
    """The build must load in stock mlx_lm and produce a token before it is published."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        model, _ = load_model(model_dir)
        if mx.default_device() == mx.cpu:
            # MLX's CPU kernels lack bf16 for some ops (expert gather-matmul); float32
            # there is what swan-serve computes in on a CPU anyway.
            model.set_dtype(mx.float32)
        tokenizer = load_tokenizer(model_dir)
        logits = model(mx.array([tokenizer.encode("Hello")]))[0, -1]
        finite = bool(mx.all(mx.isfinite(logits)).item())
    except Exception as exc:  # whatever mlx_lm raises, the build is not servable
        raise BuildError(f"the quantized model does not run in mlx_lm: {exc}") from exc
    if not finite:
        raise BuildError("the quantized model produces non-finite logits")


def check_buildable(model_dir: Path) -> None:
    """Fail in a second, with one line, on what would otherwise fail after minutes."""
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if not model_type:
        raise BuildError(f"{model_dir}/config.json has no model_type")
    if not _mlx_lm_supports(config):
        raise BuildError(f"architecture {model_type!r} is not supported by mlx-lm")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise BuildError(
            f"{model_dir} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)})"
        )
    try:  # reads every shard's header and checks its size: no tensor data yet
        open_checkpoint(model_dir)
    except CheckpointError as exc:
        raise BuildError(str(exc)) from None


def estimated_build_bytes(resolved: ResolvedModel, target_bpw: float | None) -> int:
    """Disk a build needs: the quantized weights (plus slack for float tensors and the
    manifest), from the source's safetensors sizes and the bits-per-weight target."""
    from .sources.gguf_model import source_bytes as gguf_bytes

    gguf = gguf_bytes(resolved.path)
    if gguf:  # already quantized, at an unknown bpw: allow twice its size
        return 2 * gguf + 64 * 2**20
    source_bytes = sum(p.stat().st_size for p in resolved.path.glob("*.safetensors"))
    bpw = target_bpw or 8.0
    return int(source_bytes * min(1.0, bpw / 16.0) * 1.15) + 64 * 2**20


def _mlx_lm_supports(config: dict) -> bool:
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = config["model_type"]
    model_type = MODEL_REMAPPING.get(model_type, model_type)
    return importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None


def _load_recipe(name: str, q_bits: int | None = None, q_group_size: int | None = None
                 ) -> Recipe:
    from .recipe import RecipeError, with_base_bits

    if name == "keep":  # GGUF only; its plan comes from the source (gguf_keep.py)
        name = DEFAULT_RECIPE

    try:
        return with_base_bits(load_recipe(name), q_bits, q_group_size)
    except (RecipeError, FileNotFoundError) as exc:
        raise BuildError(str(exc)) from None

