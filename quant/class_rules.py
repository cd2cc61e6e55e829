"""Classes recipes: bits per module from a table of rules by tensor class and role.

A rule selects modules by their tensor class (names.TensorClass: expert,
shared_expert, router, linear_attention, attention_q, mlp_down, embedding, ...) and
optionally their role, the MLX module's last name part ("expert:down_proj",
"linear_attention:in_proj_a"), and sets bits as an offset of the recipe's base width
d ("d", "d+2"), as a fixed width (8), as an MLX float format (mode mxfp4 / mxfp8 /
nvfp4, whose bits and group are fixed by the format) or "float". Rules may apply to
every layer, to the last `last_layers` layers only, or to the rest. The first rule that
selects a module decides it; a module no rule selects stays in float.

Widths MLX cannot store snap up to the next it can (7 -> 8; past 8, 8). A group size
that does not divide a module's input falls back to the first of 64, 32, 128 that does.
"""

from __future__ import annotations

import re

from . import modes
from .affine import SUPPORTED_BITS
from .plan import Decision
from .recipe import ClassRule, Recipe

_GROUP_FALLBACK = (64, 32, 128)


def snap_bits(bits: int) -> int:
    """The smallest width MLX stores that holds `bits` (8 at most)."""
    return next((b for b in SUPPORTED_BITS if b >= bits), SUPPORTED_BITS[-1])


def rule_bits(rule: ClassRule, base: int) -> int | None:
    """A rule's width for base width d; None for float."""
    if rule.bits == "float":
        return None
    if isinstance(rule.bits, int):
        return snap_bits(rule.bits)
    offset = int(rule.bits[2:]) if rule.bits.startswith("d+") else 0
    return snap_bits(base + offset)


def layer_index(module: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", module)
    return int(match.group(1)) if match else None


def _selects(rule: ClassRule, tensor_class: str, role: str, layer: int | None,
             n_layers: int, last: int) -> bool:
    if not any(sel == tensor_class or sel == f"{tensor_class}:{role}" for sel in rule.select):
        return False
    if rule.layers == "all":
        return True
    if layer is None:
        return False
    in_last = layer >= n_layers - last
    return in_last if rule.layers == "last" else not in_last


def decide(module: str, params: int, in_dim: int, tensor_class: str, recipe: Recipe,
           n_layers: int) -> Decision:
    """The decision of one quantizable module under a classes recipe."""
    table = recipe.classes
    role = module.rsplit(".", 1)[-1]
    base = dict(module=module, params=params, in_dim=in_dim, tensor_class=tensor_class)
    layer = layer_index(module)
    rule = next((r for r in table.rules
                 if _selects(r, tensor_class, role, layer, n_layers, table.last_layers)), None)
    if rule is None:
        return Decision(**base, reason=f"{recipe.name}: no rule selects {tensor_class}:{role}")
    why = f"{recipe.name}: {tensor_class}:{role} -> {rule.bits}"
    if rule.mode != "affine":
        group = modes.GROUP_SIZE[rule.mode]
        if in_dim % group:
            return Decision(**base, reason=f"{why}; {rule.mode} groups of {group} do not "
                                           f"divide input {in_dim}")
        return Decision(**base, bits=modes.BITS[rule.mode], group_size=group, mode=rule.mode,
                        reason=f"{recipe.name}: {tensor_class}:{role} -> {rule.mode}")
    bits = rule_bits(rule, table.bits)
    if bits is None:
        return Decision(**base, reason=why)
    wanted = rule.group_size or table.group_size
    group = next((g for g in (wanted, *_GROUP_FALLBACK) if in_dim % g == 0), None)
    if group is None:
        return Decision(**base, reason=f"{why}; no group size divides input {in_dim}")
    if group != wanted:
        why += f"; group {group} (group {wanted} does not divide)"
    return Decision(**base, bits=bits, group_size=group, reason=why)


def class_decisions(modules: list[tuple[str, int, int, str]], recipe: Recipe
                    ) -> dict[str, Decision]:
    """(module, params, in_dim, tensor class) of every quantizable module -> decisions."""
    layers = [i for m, *_ in modules if (i := layer_index(m)) is not None]
    n_layers = max(layers) + 1 if layers else 0
    return {m: decide(m, p, d, c, recipe, n_layers) for m, p, d, c in modules}
