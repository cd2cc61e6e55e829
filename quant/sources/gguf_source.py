"""A GGUF model seen as the Hugging Face checkpoint it was converted from.

GGUFCheckpoint has the interface of checkpoint.Checkpoint (what analysis and
conversion read): Hugging Face tensor names and shapes, float32 rows on demand.
Each HF tensor is a *view* of GGUF tensors that undoes what llama.cpp's converter
did on the way in:

* names (gguf_names), and stacked `*_exps` tensors cut back into one tensor per
  expert where the HF checkpoint stores them apart (Qwen3-MoE), or joined into
  Qwen3.5's stacked gate_up_proj;
* llama: the rotary row permutation of Q and K (llama.cpp interleaves each head's
  two halves);
* Qwen3.5 linear attention: value heads reordered from tiled (r-major) back to
  grouped (k-major) order, for any ratio r = n_v / n_k: the V rows of
  in_proj_qkv and conv1d, in_proj_z, in_proj_a/b, A_log, dt_bias and out_proj's
  columns; A_log = log(-ssm_a);
* Qwen3.5 conv1d is handed over in mlx_lm's layout [C, K, 1] and norms keep the
  +1 llama.cpp already added: mlx_lm's sanitize adds 1 only to checkpoints whose
  conv1d is still in PyTorch's [C, 1, K], so the shift happens exactly once.

Rows are read, permuted and dequantized only as asked: memory stays bounded by
one row block (one expert of a stacked tensor), as for safetensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, CheckpointError, Rows, TensorInfo
from .gguf_config import build_config
from .gguf_file import GGUFError, GGUFModel, GGUFTensor, open_gguf
from .gguf_names import UnknownTensorName, UnsupportedArchitecture, lookup

_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class Segment:
    """Rows [start, start+rows) of a GGUF tensor (of one expert, when stacked)."""

    tensor: GGUFTensor
    start: int
    rows: int


@dataclass(frozen=True)
class View:
    """How an HF tensor [slots?, rows, cols] is read from GGUF segments."""

    info: TensorInfo
    segments: tuple[Segment, ...]  # concatenated along rows (the same for every slot)
    experts: bool = False  # a stacked [E, rows, cols] HF tensor: slot e is GGUF expert e
    row_perm: np.ndarray | None = None  # HF row i is (concatenated) source row row_perm[i]
    col_perm: np.ndarray | None = None
    value: Callable[[np.ndarray], np.ndarray] | None = None
    slot_rows: int = 0  # rows of one expert in the GGUF stack (stacked segments)


def _dtype(tensor: GGUFTensor) -> str:
    """What the tensor's values fit in exactly: its own float type, or float16 for
    quantized blocks (whose scales are float16)."""
    return tensor.type.name if tensor.type.name in _ITEMSIZE else "F16"


class GGUFCheckpoint(Checkpoint):
    def __init__(self, root: Path, model: GGUFModel, config: dict, views: dict[str, View]):
        infos = [views[n].info for n in sorted(views)]
        super().__init__(root, config, infos, [p.name for p in model.files])
        self.model, self.views = model, views

    def _view(self, name: str) -> View:
        if name not in self.views:
            raise KeyError(f"no tensor named {name!r} in {self.model.files[0].name}")
        return self.views[name]

    def _rows(self, view: View, slot: int | None, rows: np.ndarray) -> np.ndarray:
        src = view.row_perm[rows] if view.row_perm is not None else rows
        if len(view.segments) == 1:  # the common case: no gather, no copy
            seg = view.segments[0]
            first = seg.start + (slot or 0) * view.slot_rows
            return self._finish(view, self.model.read_rows(seg.tensor, _as_slice(src),
                                                           first_row=first))
        out = None
        base = 0
        for seg in view.segments:
            mask = (src >= base) & (src < base + seg.rows)
            if mask.any():
                first = seg.start + (slot or 0) * view.slot_rows
                part = self.model.read_rows(seg.tensor, _as_slice(src[mask] - base),
                                            first_row=first)
                if out is None:
                    out = np.empty((len(src), part.shape[1]), dtype=np.float32)
                out[mask] = part
            base += seg.rows
        assert out is not None
        return self._finish(view, out)

    @staticmethod
    def _finish(view: View, out: np.ndarray) -> np.ndarray:
        if view.col_perm is not None:
            out = out[:, view.col_perm]
        if view.value is not None:
            out = view.value(out)
        return out

    def _index(self, view: View, rows: Rows) -> np.ndarray:
        n = view.info.shape[-2] if view.experts else self._matrix_rows(view)
        if isinstance(rows, slice):
            return np.arange(n)[rows]
        return np.asarray(rows, dtype=np.int64)

    def read(self, name: str) -> np.ndarray:
        view = self._view(name)
        info = view.info
        if view.experts:
            return np.stack([self.read_expert(name, e) for e in range(info.shape[0])])
        rows = self._rows(view, None, np.arange(self._matrix_rows(view)))
        return rows.reshape(info.shape)

    def _matrix_rows(self, view: View) -> int:
        return sum(s.rows for s in view.segments)

    def read_rows(self, name: str, rows: Rows) -> np.ndarray:
        view = self._view(name)
        if view.info.ndim < 1:
            raise ValueError(f"{name} is a scalar; it has no rows")
        if view.info.ndim == 1:
            return self.read(name)[rows if isinstance(rows, slice) else np.asarray(rows)]
        return self._rows(view, None, self._index(view, rows))

    def read_expert(self, name: str, expert: int) -> np.ndarray:
        return self.read_expert_rows(name, expert, slice(None))

    def read_expert_rows(self, name: str, expert: int, rows: Rows) -> np.ndarray:
        view = self._view(name)
        if not view.experts:
            raise ValueError(f"{name} has shape {view.info.shape}; stacked experts are "
                             "[E, out, in]")
        if not 0 <= expert < view.info.shape[0]:
            raise IndexError(f"expert {expert} out of range for {name}")
        return self._rows(view, expert, self._index(view, rows))

    def lazy_arrays(self, names: list[str]) -> dict:
        import mlx.core as mx

        dtypes = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
        return {n: mx.array(self.read(n)).astype(dtypes[self.info(n).dtype]) for n in names}

    def fingerprint(self) -> str:
        """sha256 over each file's name, size and header (metadata and tensor infos)."""
        digest = hashlib.sha256()
        for path, header in zip(self.model.files, self.model.header_bytes, strict=True):
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as fh:
                digest.update(fh.read(header))
        return digest.hexdigest()


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive rows as a slice: a memmap slice reads them in one sweep,
    where an index array gathers row by row."""
    if len(index) and index[-1] - index[0] + 1 == len(index) and (
            len(index) == 1 or bool(np.all(np.diff(index) == 1))):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


# --- building the views ---------------------------------------------------------------


def _info(name: str, dtype: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, dtype, shape, "", 0, math.prod(shape) * _ITEMSIZE[dtype])


def _rotary_perm(n_heads: int, rows: int) -> np.ndarray:
    """HF row -> GGUF row for llama.cpp's Q/K permute (each head's halves interleaved)."""
    hd = rows // n_heads
    gguf_index = np.arange(rows).reshape(n_heads, hd // 2, 2)
    return gguf_index.transpose(0, 2, 1).reshape(-1)


def v_head_perm(n_k: int, n_v: int, head_dim: int) -> np.ndarray:
    """HF (grouped: k-major) index -> GGUF (tiled: r-major) index of value channels,
    for any ratio r = n_v / n_k: GGUF holds [r, n_k, head_dim] where HF holds
    [n_k, r, head_dim]."""
    r = n_v // n_k
    gguf_index = np.arange(n_v * head_dim).reshape(r, n_k, head_dim)
    return gguf_index.transpose(1, 0, 2).reshape(-1)


def _shift(perm: np.ndarray, offset: int) -> np.ndarray:
    """Leave the first `offset` channels in place, permute the rest."""
    return np.concatenate([np.arange(offset), perm + offset])


def _a_log(values: np.ndarray) -> np.ndarray:
    """A_log from llama.cpp's ssm_a = -exp(A_log). float32 exp is many-to-one, so A_log
    itself can be 1 ulp off; of the candidates next to log(-a), take one whose
    float32 exp gives back the stored value exactly: the A the model computes."""
    target = -values.astype(np.float32)
    best = np.log(target.astype(np.float64)).astype(np.float32)
    found = np.exp(best) == target
    for step in (1, -1, 2, -2):
        candidate = best.view(np.int32) + np.int32(step)
        candidate = candidate.view(np.float32)
        fix = ~found & (np.exp(candidate) == target)
        best = np.where(fix, candidate, best)
        found |= fix
    return best


class _Builder:
    def __init__(self, model: GGUFModel, config: dict):
        self.model, self.arch = model, model.arch
        self.text = config.get("text_config", config)
        self.views: dict[str, View] = {}

    def add(self, gguf_name: str) -> None:
        tensor = self.model.tensors[gguf_name]
        try:
            mapping = lookup(self.arch, gguf_name)
        except UnknownTensorName:
            raise GGUFError(f"{tensor.file.name}: tensor {gguf_name} is not part of a "
                            f"{self.arch} model") from None
        if mapping is None:
            return
        if mapping.per_expert:
            self._per_expert(tensor, mapping.hf)
        elif gguf_name.endswith("_exps.weight"):
            self._stacked(tensor, mapping.hf, mapping.part)
        else:
            self._plain(tensor, mapping.hf)

    def _per_expert(self, tensor: GGUFTensor, pattern: str) -> None:
        n_experts, rows, cols = _expect_3d(tensor)
        for e in range(n_experts):
            info = _info(pattern.format(e=e), _dtype(tensor), (rows, cols))
            self.views[info.name] = View(info, (Segment(tensor, e * rows, rows),))

    def _stacked(self, tensor: GGUFTensor, hf: str, part: str) -> None:
        n_experts, rows, cols = _expect_3d(tensor)
        if part == "all":
            info = _info(hf, _dtype(tensor), (n_experts, rows, cols))
            self.views[hf] = View(info, (Segment(tensor, 0, rows),), experts=True,
                                  slot_rows=rows)
            return
        # Qwen3.5 gate_up_proj: gate rows then up rows, joined once both are seen.
        halves = self.views.get(hf)
        segs = list(halves.segments) if halves else []
        segs.append(Segment(tensor, 0, rows))
        segs.sort(key=lambda s: "up_exps" in s.tensor.name)  # gate first
        total = sum(s.rows for s in segs)
        info = _info(hf, _dtype(tensor), (n_experts, total, cols))
        self.views[hf] = View(info, tuple(segs), experts=True, slot_rows=rows)

    def _plain(self, tensor: GGUFTensor, hf: str) -> None:
        shape = tensor.shape
        row_perm = col_perm = value = None
        t = self.text
        if self.arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = t["num_attention_heads"] if "q_proj" in hf else t["num_key_value_heads"]
            row_perm = _rotary_perm(heads, shape[0])
        if ".linear_attn." in hf:
            row_perm, col_perm = self._linear_attn_perms(hf, shape)
            if hf.endswith(".A_log"):
                value = _a_log
            if hf.endswith("conv1d.weight"):
                shape = (*shape, 1)  # mlx_lm's [C, K, 1]: see the module docstring
        dtype = "F32" if hf.endswith(".A_log") else _dtype(tensor)
        info = _info(hf, dtype, shape)
        self.views[hf] = View(info, (Segment(tensor, 0, tensor.rows),), row_perm=row_perm,
                              col_perm=col_perm, value=value)

    def _linear_attn_perms(self, hf: str, shape) -> tuple:
        t = self.text
        n_k, n_v = t["linear_num_key_heads"], t["linear_num_value_heads"]
        hk, hv = t["linear_key_head_dim"], t["linear_value_head_dim"]
        if n_v % n_k:
            raise GGUFError(f"linear attention with {n_v} value heads over {n_k} key heads")
        if hf.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            return _shift(v_head_perm(n_k, n_v, hv), 2 * n_k * hk), None
        if hf.endswith("in_proj_z.weight"):
            return v_head_perm(n_k, n_v, hv), None
        if hf.endswith(("in_proj_a.weight", "in_proj_b.weight")):
            return v_head_perm(n_k, n_v, 1), None
        if hf.endswith((".A_log", ".dt_bias")):
            return None, v_head_perm(n_k, n_v, 1)
        if hf.endswith("out_proj.weight"):
            return None, v_head_perm(n_k, n_v, hv)
        return None, None


def _expect_3d(tensor: GGUFTensor) -> tuple[int, int, int]:
    if len(tensor.shape) != 3:
        raise GGUFError(f"{tensor.file.name}: tensor {tensor.name} has shape "
                        f"{list(tensor.shape)}; stacked experts are [E, out, in]")
    return tensor.shape  # type: ignore[return-value]


def _check_shapes(model: GGUFModel, views: dict[str, View], config: dict) -> None:
    """A tensor whose shape contradicts the metadata is an error naming it."""
    t = config.get("text_config", config)
    hidden = t["hidden_size"]
    for view in views.values():
        seg = view.segments[0]
        name = seg.tensor.name
        if name.startswith("blk.") and int(name.split(".")[1]) >= t["num_hidden_layers"]:
            raise GGUFError(f"{seg.tensor.file.name}: tensor {name} is beyond block_count "
                            f"{t['num_hidden_layers']}")
        if name.endswith(("attn_norm.weight", "ffn_norm.weight", "output_norm.weight")):
            if view.info.shape != (hidden,):
                raise GGUFError(f"{seg.tensor.file.name}: tensor {name} has shape "
                                f"{list(seg.tensor.shape)}, the metadata says {hidden} wide")
        if name in ("token_embd.weight", "output.weight") and view.info.shape[-1] != hidden:
            raise GGUFError(f"{seg.tensor.file.name}: tensor {name} has shape "
                            f"{list(seg.tensor.shape)}, the metadata says {hidden} wide")


def open_gguf_checkpoint(gguf_path: str | Path, root: Path | None = None) -> GGUFCheckpoint:
    """The GGUF model (first shard) as a Checkpoint; `root` is the folder of its side
    files (tokenizer, config), by default the GGUF's own folder."""
    try:
        model = open_gguf(gguf_path)
        config = build_config(model)
        builder = _Builder(model, config)
        for name in sorted(model.tensors):
            builder.add(name)
        _check_shapes(model, builder.views, config)
    except (GGUFError, UnsupportedArchitecture) as exc:
        raise CheckpointError(str(exc)) from None
    root = root if root is not None else Path(gguf_path).expanduser().resolve().parent
    return GGUFCheckpoint(root, model, config, builder.views)


def check_against_model(ckpt: GGUFCheckpoint) -> None:
    """Every tensor mlx_lm's model needs is there, in the shape the metadata implies.

    The model is built from the config lazily and sanitize runs on lazy zeros of
    the HF shapes: shapes only, nothing is computed or allocated."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..mlx_names import NameMapError, build_model

    try:
        model = build_model(ckpt.config)
    except NameMapError as exc:
        raise GGUFError(f"{ckpt.model.files[0].name}: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    lazy = {t.name: mx.zeros(t.shape, dtype=mx.float16) for t in ckpt.tensors}
    try:
        got = {k: tuple(v.shape) for k, v in model.sanitize(lazy).items()}
    except (ValueError, IndexError) as exc:
        raise GGUFError(f"{ckpt.model.files[0].name}: tensor shapes contradict the "
                        f"metadata ({exc})") from None
    arch = ckpt.model.arch
    for key, shape in sorted(expected.items()):
        if key not in got:
            raise GGUFError(f"{ckpt.model.files[0].name}: tensor "
                            f"{_gguf_name_for(arch, key)} is missing")
        if got[key] != shape:
            name = _gguf_name_for(arch, key)
            tensor = ckpt.model.tensors.get(name)
            where = tensor.file.name if tensor else ckpt.model.files[0].name
            raise GGUFError(f"{where}: tensor {name} has the wrong shape for the metadata "
                            f"(mlx_lm's {key} would be {list(got[key])}, the config "
                            f"implies {list(shape)})")


def _gguf_name_for(arch: str, mlx_key: str) -> str:
    """Best guess of the GGUF tensor behind an mlx_lm parameter, for error messages."""
    import re

    from .gguf_names import to_gguf

    hf = mlx_key.replace("language_model.model.", "model.language_model.")
    hf = hf.replace("language_model.lm_head", "lm_head")
    match = re.match(r"(.*)\.switch_mlp\.(\w+)\.weight$", hf)
    if match:
        prefix, proj = match.groups()
        if arch in ("qwen35", "qwen35moe"):
            hf = f"{prefix}.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        else:
            hf = f"{prefix}.experts.0.{proj}.weight"
    try:
        name = to_gguf(arch, hf)
    except KeyError:
        return mlx_key
    if arch in ("qwen35", "qwen35moe") and match and "up_proj" in match.group(2):
        name = name.replace("ffn_gate_exps", "ffn_up_exps")
    return name
