"""Projections that read the same input, stored as one matrix the model's own layers share.

A decoder layer's query, key and value projections read the same normed hidden state, and so do
its gate and up projections. ``fuse_projections`` concatenates each such group's weights (and
biases) into one matrix and points every member ``nn.Linear`` at its rows of it: a contiguous
row slice, the same values, so transformers' forward computes exactly what it did, and the
memory is the same (the separate tensors are released). The fast engine's native decode step
then reads each group with one matrix product instead of three or two.

Quantised models (``worker.quantize``) fuse before quantising: the group's matrix is quantised
once with the layer's torchao config and each member gets its rows of the quantised tensor
(``share_rows``). int8 and int4 scale each output row on its own, so the rows are the values
the member would have got quantised alone; each slice is checked against the fused product on a
random input before it is used, and a group that fails any of this stays unfused.

Only the groups named in ``GROUPS`` are fused, only when every member is a plain ``nn.Linear``
on one device with the same input width (Phi-3's ``qkv_proj`` / ``gate_up_proj`` are fused
already). ``fused_group(owner, names)`` answers the fused matrix a layer's native step may use,
or None when the members no longer share it (a later change to the model).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("mlp", ("gate_proj", "up_proj")),
)
"""(attribute of a decoder layer, the projections of it that read one input), in output order."""


@dataclass
class FusedGroup:
    """One group's matrix, and the member tensors that are its rows."""

    names: tuple[str, ...]
    weight: torch.Tensor
    """[sum of the members' outputs, input width]: a plain tensor or a torchao tensor."""
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    """Each member's output rows, in order."""
    parts: tuple[torch.Tensor, ...]
    """The member weights as set on the modules (``fused_group`` checks they are still set)."""


_GROUPS: weakref.WeakKeyDictionary[torch.nn.Module, FusedGroup] = weakref.WeakKeyDictionary()


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a ``*ForCausalLM`` (``model.model.layers``), or []."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _members(owner: Any, names: tuple[str, ...]) -> list[torch.nn.Linear] | None:
    members = [getattr(owner, name, None) for name in names]
    if not all(type(m) is torch.nn.Linear for m in members):
        return None
    linears: list[torch.nn.Linear] = members  # type: ignore[assignment]
    first = linears[0].weight
    if any(
        m.in_features != linears[0].in_features
        or m.weight.device != first.device
        or (m.bias is None) != (linears[0].bias is None)
        for m in linears
    ):
        return None
    return linears


def groups_of(model: Any) -> Iterator[tuple[Any, tuple[str, ...], list[torch.nn.Linear]]]:
    """(owner module, member names, members) for every group of ``GROUPS`` the model has."""
    for layer in decoder_layers(model):
        for attribute, names in GROUPS:
            owner = getattr(layer, attribute, None)
            members = _members(owner, names) if owner is not None else None
            if members is not None:
                yield owner, names, members


def is_plain(tensor: torch.Tensor) -> bool:
    """A tensor of torch's own (not a torchao subclass)."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def fused_group(owner: Any, names: tuple[str, ...]) -> FusedGroup | None:
    """The fused matrix of ``owner``'s ``names``, if every member still holds its rows."""
    group = _GROUPS.get(owner)
    if group is None or group.names != names:
        return None
    members = [getattr(owner, name, None) for name in names]
    if any(m is None or m.weight is not part for m, part in zip(members, group.parts, strict=True)):
        return None
    if is_plain(group.weight):  # the rows must still be the fused matrix's own memory
        row_bytes = group.weight.stride(0) * group.weight.element_size()
        starts = [sum(group.sizes[:k]) for k in range(len(group.sizes))]
        pointer = group.weight.data_ptr()
        if any(
            part.data_ptr() != pointer + start * row_bytes
            for part, start in zip(group.parts, starts, strict=True)
        ):
            return None
    return group


def fused_tensors(model: Any) -> list[torch.Tensor]:
    """The fused matrices (and biases) of ``model``'s groups: memory its parameters share,
    except what a quantised slice had to copy (``share_rows``), which the fused matrix keeps too."""
    out: list[torch.Tensor] = []
    for owner, names, _ in groups_of(model):
        group = fused_group(owner, names)
        if group is not None:
            out += [group.weight] + ([group.bias] if group.bias is not None else [])
    return out


@torch.no_grad()
def fuse_projections(model: Any) -> int:
    """Fuse every full-precision group (weights become row views of one matrix); the number of
    groups fused now. Already fused groups and quantised members are left as they are."""
    fused = 0
    for owner, names, members in groups_of(model):
        if fused_group(owner, names) is not None or not all(is_plain(m.weight) for m in members):
            continue
        weight = torch.cat([m.weight.detach() for m in members])
        bias = None
        if members[0].bias is not None:
            bias = torch.cat([m.bias.detach() for m in members])  # type: ignore[union-attr]
        sizes = tuple(m.out_features for m in members)
        parts = []
        for member, rows, bias_rows in zip(
            members,
            weight.split(sizes),
            bias.split(sizes) if bias is not None else [None] * len(sizes),
            strict=True,
        ):
            member.weight.data = rows
            if bias_rows is not None:
                member.bias.data = bias_rows  # type: ignore[union-attr]
            parts.append(member.weight)
        _GROUPS[owner] = FusedGroup(names, weight, bias, sizes, tuple(parts))
        fused += 1
    return fused


def share_rows(
    weight: torch.Tensor, start: int, end: int, copy_strided: bool = True
) -> torch.Tensor:
    """Rows ``start:end`` of ``weight`` without copying its data (a torchao tensor slices its
    inner tensors). ``copy_strided``: any inner tensor the slice leaves non-contiguous, such as
    int4's per-group scales, is copied, for kernels that want them contiguous (gemlite's take
    strides and read the slice in place)."""
    part = weight[start:end]
    if is_plain(part) or not copy_strided:
        return part
    flatten = getattr(part, "__tensor_flatten__", None)
    if flatten is None:
        return part
    names, context = flatten()
    inner = {name: getattr(part, name) for name in names}
    if all(t is None or t.is_contiguous() for t in inner.values()):
        return part
    inner = {name: t.contiguous() if t is not None else t for name, t in inner.items()}
    return type(part).__tensor_unflatten__(inner, context, part.shape, part.stride())  # type: ignore[attr-defined]


@torch.no_grad()
def quantize_fused(
    model: Any, quantize_module: Callable[[torch.nn.Linear], None]
) -> tuple[int, list[str]]:
    """Fuse, then quantise each group's matrix once (``quantize_module`` quantises a Linear in
    place) and give each member its rows; (groups quantised fused, why others were not).

    A group whose slices do not reproduce the fused product on a random input, or whose
    quantisation raised (other than out of memory), is restored to separate full-precision
    members, for the caller to quantise one by one.
    """
    fuse_projections(model)
    done, problems = 0, []
    for owner, names, members in list(groups_of(model)):
        group = fused_group(owner, names)
        if group is None or not is_plain(group.weight):
            continue
        try:
            whole = torch.nn.Linear(
                group.weight.shape[1],
                group.weight.shape[0],
                bias=False,
                device=group.weight.device,
                dtype=group.weight.dtype,
            )
            whole.weight = torch.nn.Parameter(group.weight, requires_grad=False)
            quantize_module(whole)
            quantized = whole.weight
            if is_plain(quantized):
                raise ValueError("torchao left the fused matrix in full precision")
            parts = _quantized_parts(quantized, group.sizes, group.weight.dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # the group stays as transformers built it
            problems.append(f"{'/'.join(names)}: {type(exc).__name__}: {str(exc)[:120]}")
            _unfuse(owner, group, members)
            continue
        for member, part in zip(members, parts, strict=True):
            member.weight = torch.nn.Parameter(part, requires_grad=False)
        _GROUPS[owner] = FusedGroup(
            names,
            quantized,
            group.bias,
            group.sizes,
            tuple(m.weight for m in members),
        )
        done += 1
    return done, problems


def _quantized_parts(
    quantized: torch.Tensor, sizes: tuple[int, ...], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Each member's rows of the quantised matrix, checked against the fused product (one row
    and a prefill's worth of rows: kernels differ by row count). A slice is kept in place when
    its kernels compute it so; else its strided inner tensors are copied (``share_rows``)."""
    generator = torch.Generator().manual_seed(0)
    probes = [
        torch.randn((rows, quantized.shape[1]), generator=generator, dtype=torch.float32).to(
            device=quantized.device, dtype=dtype
        )
        for rows in (1, 2, 80)
    ]
    wholes = [torch.nn.functional.linear(probe, quantized).float() for probe in probes]

    def reproduces(part: torch.Tensor, start: int, size: int) -> bool:
        if tuple(part.shape) != (size, quantized.shape[1]):
            return False
        for probe, whole in zip(probes, wholes, strict=True):
            try:
                got = torch.nn.functional.linear(probe, part).float()
            except (RuntimeError, ValueError, AssertionError, NotImplementedError):
                return False
            want = whole[:, start : start + size]
            if float((got - want).abs().max()) > 1e-3 * (float(want.abs().max()) or 1.0):
                return False
        return True

    parts, start = [], 0
    for size in sizes:
        part = share_rows(quantized, start, start + size, copy_strided=False)
        if not reproduces(part, start, size):
            part = share_rows(quantized, start, start + size)
            if not reproduces(part, start, size):
                raise ValueError(f"rows {start}:{start + size} do not reproduce the fused product")
        parts.append(part)
        start += size
    return parts


def unfuse_projections(model: Any) -> int:
    """Give every fused group's members their own copies back (before quantising them one by
    one: a member's new weight would otherwise leave the fused matrix held); how many."""
    count = 0
    for owner, names, members in list(groups_of(model)):
        group = fused_group(owner, names)
        if group is not None and is_plain(group.weight):
            _unfuse(owner, group, members)
            count += 1
    return count


def _unfuse(owner: Any, group: FusedGroup, members: list[torch.nn.Linear]) -> None:
    """Give each member its own full-precision copy back (the fused matrix goes)."""
    _GROUPS.pop(owner, None)
    for member in members:
        member.weight = torch.nn.Parameter(member.weight.detach().clone(), requires_grad=False)
        if member.bias is not None:
            member.bias = torch.nn.Parameter(member.bias.detach().clone(), requires_grad=False)
