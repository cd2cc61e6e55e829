"""Where a per-input-channel scale can be folded losslessly, found from mlx_lm's names.

A fold group is a set of linear modules ("consumers") that all read the same
activation x, and the tensor that produces x and can absorb the inverse scale:

* ``norm``: an RMSNorm weight feeding the consumers. Multiplying every consumer's
  columns by s and dividing the norm weight by s leaves W @ norm(x) unchanged.
  input_layernorm feeds q/k/v (and in Qwen3-Next/3.5 the linear-attention input
  projections); post_attention_layernorm feeds gate/up, and for MoE the router,
  every expert, the shared expert and its gate: one common s for all of them.
* ``rows``: a linear module whose output rows are the consumer's input channels,
  with only channel-wise linear maps in between: up_proj -> down_proj (SwiGLU is
  silu(gate) * up, linear in up per channel; one group per expert for stacked
  experts) and v_proj -> o_proj (attention mixes tokens, not channels; with GQA
  o's input channel h*head_dim + d comes from kv head h // (n_heads / n_kv), so
  the scale lives on v's rows and is repeated onto o's columns: `expand`).

Only architectures whose layers are known to be exactly this are folded, and a
layer holding a linear module we do not recognise is skipped whole: a fold that
misses one consumer would change the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .mlx_names import MlxTensor, NameMap

# model_type -> checked by reading mlx_lm/models/<type>.py: RMSNorm before attention
# and MLP, SwiGLU MLPs, no norm or nonlinearity on v.
FOLDABLE_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe",
})
ATTN_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
               "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a",
               "linear_attn.in_proj_b", "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba")
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj", "mlp.gate", "mlp.switch_mlp.gate_proj",
              "mlp.switch_mlp.up_proj", "mlp.shared_expert.gate_proj",
              "mlp.shared_expert.up_proj", "mlp.shared_expert_gate")
# (producer, consumer): producer rows feed consumer columns through channel-wise maps.
ROW_FOLDS = (("mlp.up_proj", "mlp.down_proj"),
             ("mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"),
             ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
             ("self_attn.v_proj", "self_attn.o_proj"))
OTHER_MODULES = ("self_attn.o_proj", "linear_attn.out_proj", "mlp.down_proj",
                 "mlp.switch_mlp.down_proj", "mlp.shared_expert.down_proj")
_KNOWN = frozenset(ATTN_INPUTS + MLP_INPUTS + OTHER_MODULES)
_LAYER = re.compile(r"^(.*\blayers\.\d+)\.(.+)$")


@dataclass(frozen=True)
class FoldGroup:
    name: str  # e.g. "model.layers.0.input_layernorm" or "...down_proj[3]"
    # (MLX module, slot) pairs whose columns are multiplied by s[expand].
    consumers: tuple[tuple[MlxTensor, int], ...]
    size: int  # length of s
    norm: str | None = None  # HF name of the norm weight divided by s
    producer: tuple[MlxTensor, int] | None = None  # module and slot whose rows / s
    expand: np.ndarray | None = None  # consumer column j uses s[expand[j]]; None: j


def fold_groups(config: dict, name_map: NameMap) -> list[FoldGroup]:
    """Every lossless fold group of the model (empty for an unknown architecture)."""
    text = config.get("text_config", config)
    if config.get("model_type") not in FOLDABLE_TYPES:
        return []
    layers: dict[str, dict[str, MlxTensor]] = {}
    for t in name_map.quantizable():
        m = _LAYER.match(t.module)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = t
    floats = {t.key: t for t in name_map.floats()}
    groups: list[FoldGroup] = []
    for prefix, modules in sorted(layers.items()):
        if set(modules) - _KNOWN:
            continue  # something we do not know reads one of these activations
        for norm_name, inputs in (("input_layernorm", ATTN_INPUTS),
                                  ("post_attention_layernorm", MLP_INPUTS)):
            group = _norm_group(f"{prefix}.{norm_name}", modules, inputs, floats)
            if group is not None:
                groups.append(group)
        for producer, consumer in ROW_FOLDS:
            if producer in modules and consumer in modules:
                groups.extend(_row_groups(f"{prefix}.{consumer}", modules[producer],
                                          modules[consumer], text))
    return groups


def _norm_group(name: str, modules: dict[str, MlxTensor], inputs: tuple[str, ...],
                floats: dict[str, MlxTensor]) -> FoldGroup | None:
    norm = floats.get(f"{name}.weight")
    fed = [modules[k] for k in inputs if k in modules]
    if norm is None or not fed or len(norm.sources) != 1 or len(norm.shape) != 1:
        return None
    size = norm.shape[0]
    if any(t.shape[-1] != size for t in fed):
        return None
    consumers = tuple((t, slot) for t in fed for slot in range(max(1, len(t.slots))))
    return FoldGroup(name, consumers, size, norm=norm.sources[0])


def _row_groups(name: str, producer: MlxTensor, consumer: MlxTensor, text: dict
                ) -> list[FoldGroup]:
    rows, cols = producer.shape[-2], consumer.shape[-1]
    expand = None
    if producer.module.endswith("v_proj"):
        expand = _gqa_expand(text, rows, cols)
        if expand is None:
            return []
    elif rows != cols:
        return []
    if len(producer.slots) != len(consumer.slots):
        return []
    if len(consumer.slots) == 1:
        return [FoldGroup(name, ((consumer, 0),), rows, producer=(producer, 0), expand=expand)]
    return [FoldGroup(f"{name}[{e}]", ((consumer, e),), rows, producer=(producer, e),
                      expand=expand) for e in range(len(consumer.slots))]


def _gqa_expand(text: dict, v_rows: int, o_cols: int) -> np.ndarray | None:
    """o_proj column -> v_proj row, or None where the head layout is not plain GQA."""
    n_heads = text.get("num_attention_heads")
    n_kv = text.get("num_key_value_heads") or n_heads
    if not n_heads or not n_kv or n_heads % n_kv:
        return None
    head_dim = text.get("head_dim") or text.get("hidden_size", 0) // n_heads
    if v_rows != n_kv * head_dim or o_cols != n_heads * head_dim:
        return None
    cols = np.arange(o_cols)
    head, d = cols // head_dim, cols % head_dim
    return (head // (n_heads // n_kv)) * head_dim + d
