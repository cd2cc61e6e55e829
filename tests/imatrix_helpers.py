"""Write real llama.cpp imatrix files for the tiny fixtures (tests only).

The fixture model runs in mlx_lm on some text with a recorder around every
quantizable module, which sums x^2 per input channel and counts tokens the way
llama.cpp's imatrix collector does (per expert, over the tokens routed to it,
for stacked experts). The sums are then written under llama.cpp's GGUF tensor
names (gguf_names.to_gguf) in the GGUF format (the `gguf` package's GGUFWriter)
or the legacy .dat format (struct).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.sources import gguf_names
from swan_serve.quant.sources.checkpoint import open_checkpoint
from swan_serve.quant.sources.imatrix import gguf_arch

TEXT = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp. "
    "def parse(s):\n    return [int(x) for x in s.split(',')]\n"
    "Compound interest grows because interest is paid on interest. "
    "The French Revolution began in 1789 with the storming of the Bastille."
)


@dataclass
class Sums:
    values: np.ndarray  # [n_mat, n_in] float64 sum of x^2
    counts: np.ndarray  # [n_mat] tokens seen


class _Recorder(nn.Module):
    """Calls the wrapped module and adds its input's (or, for the final norm standing
    in for a tied head, its output's) x^2 to `sums[name]`."""

    def __init__(self, inner: nn.Module, name: str, sums: dict, on_output: bool = False):
        super().__init__()
        self.inner = inner
        # a dict attribute would become a child of the module tree: hide it in a closure
        self._store = lambda: sums
        self._name, self._on_output = name, on_output

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        seen = np.array((out if self._on_output else x).astype(mx.float32))
        if args:  # a SwitchLinear: (x, expert indices)
            idx = np.array(args[0])
            xs = seen.reshape(seen.shape[:-2] + seen.shape[-1:])
            xs = np.broadcast_to(xs, idx.shape + xs.shape[-1:]).reshape(-1, xs.shape[-1])
            n_mat = self.inner.weight.shape[0]
            values = np.zeros((n_mat, xs.shape[-1]))
            np.add.at(values, idx.reshape(-1), np.square(xs, dtype=np.float64))
            counts = np.bincount(idx.reshape(-1), minlength=n_mat).astype(np.float64)
        else:
            flat = seen.reshape(-1, seen.shape[-1]).astype(np.float64)
            values, counts = np.square(flat).sum(axis=0)[None], np.array([float(len(flat))])
        store = self._store()
        old = store.get(self._name)
        store[self._name] = Sums(values, counts) if old is None else Sums(
            old.values + values, old.counts + counts)
        return out


def _wrap(model: nn.Module, path: str, sums: dict, on_output: bool = False) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model
    for part in parent_path.split(".") if parent_path else []:
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    parent[leaf] = _Recorder(parent[leaf], path, sums, on_output)


def record_sums(model_dir: Path, text: str = TEXT, llama_order: bool = True
                ) -> dict[str, Sums]:
    """GGUF tensor name -> sums of x^2 and counts, from running the model on text;
    llama_order: input channels in the order llama.cpp's converted model has them."""
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    ckpt = open_checkpoint(model_dir)
    arch = gguf_arch(ckpt.config["model_type"])
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    by_module: dict[str, dict] = {}
    for t in name_map.quantizable():
        if t.module.endswith("embed_tokens"):
            continue  # a lookup (or a tied head: recorded at the final norm below)
        _wrap(model, t.module, by_module)
    tied = "lm_head" not in {t.module for t in name_map.quantizable()}
    if tied:
        _wrap(model, "model.norm", by_module, on_output=True)
    model(mx.array([tokenizer.encode(text)]))
    out: dict[str, Sums] = {}
    modules = name_map.by_module()
    for path, sums in by_module.items():
        hf = (f"{gguf_names.model_prefix(arch)}.embed_tokens.weight" if path == "model.norm"
              else modules[path].sources[0])
        if llama_order and hf.endswith("linear_attn.out_proj.weight"):
            sums = Sums(_tiled(ckpt.config, sums.values), sums.counts)
        out[gguf_names.to_gguf(arch, hf)] = sums
    return out


def _tiled(config: dict, values: np.ndarray) -> np.ndarray:
    """Qwen3.5's out_proj input as llama.cpp sees it: the converter (the fixture GGUF
    writer's model of it) tiles the value heads along that axis."""
    from swan_serve.quant.fixtures.gguf_writer import _reorder_v

    t = config.get("text_config", config)
    return _reorder_v(values, 1, t["linear_num_key_heads"], t["linear_num_value_heads"],
                      t["linear_value_head_dim"])


def write_gguf(path: Path, sums: dict[str, Sums], chunk_count: int = 1) -> Path:
    """llama.cpp's GGUF imatrix layout: <name>.in_sum2 [n_mat, n_in], <name>.counts [n_mat, 1]."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "imatrix-test")
    writer.kv_data[0].pop("general.architecture", None)  # llama.cpp writes none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["fixture-text"])
    writer.add_uint32("imatrix.chunk_count", chunk_count)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, s in sorted(sums.items()):
        writer.add_tensor(f"{name}.in_sum2", s.values.astype(np.float32))
        writer.add_tensor(f"{name}.counts", s.counts.astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_dat(path: Path, sums: dict[str, Sums], ncall: int = 3) -> Path:
    """The legacy format: per entry the mean x^2 times ncall (1.0 * ncall for an
    expert that saw nothing), then the chunk count and the dataset name."""
    out = [struct.pack("<i", len(sums))]
    for name, s in sorted(sums.items()):
        seen = s.counts > 0
        means = np.where(seen[:, None], s.values / np.where(seen, s.counts, 1)[:, None], 1.0)
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, means.size),
                (means * ncall).astype("<f4").tobytes()]
    dataset = b"fixture-text"
    out += [struct.pack("<i", 1), struct.pack("<i", len(dataset)), dataset]
    path.write_bytes(b"".join(out))
    return path
