"""The fast engine's KV cache: one preallocated slot row per sequence in flight.

Per layer [max_batch, kv_heads, capacity, head_dim], allocated on the first write (shapes from
the key states, so any head layout works). A sequence's token at position p lives in slot p of
its row, so rows that started at different times each write at their own position
(``write_pos``, one slot per row and query token). The last slot (``trash``) is never read as a
sequence's token: writes that must go nowhere (padding, rows not decoding) land there.
"""

from __future__ import annotations

from typing import Any

import torch


class SlotCache:
    """Duck-types what transformers' attention layers call (``update``).

    Before a forward the engine sets which cache rows it feeds (``rows``: the first ``rows`` rows,
    the decode graphs' layout, or ``row_index`` for a prefill into scattered free rows), where
    each fed token goes (``write_pos``, [fed rows, query tokens]) and how many slots the forward
    attends to (``visible``; None: the whole capacity, decode).
    """

    is_compileable = True

    def __init__(self, max_batch: int, capacity: int) -> None:
        self.max_batch = max_batch
        self.capacity = capacity
        """Slots per row, the trash slot included."""
        self.rows = max_batch
        self.row_index: torch.Tensor | None = None
        self.write_pos: torch.Tensor | None = None
        self.visible: int | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def trash(self) -> int:
        return self.capacity - 1

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys and values at ``write_pos``; return the attended slots.

        Takes whatever else the attention layer passes (``cache_kwargs`` positionally in
        transformers 5.17, ``kwargs=`` in 5.24): nothing in it changes where the states go.
        """
        if layer_idx == len(self.keys):
            self._allocate(key_states, value_states)
        assert self.write_pos is not None
        device = key_states.device
        slots = self.write_pos
        if slots.device != device:  # layer-sharded over several GPUs
            slots = slots.to(device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.row_index is None:
            # the first rows (decode): one scatter per tensor, as cheap as a plain index copy
            keys, values = keys[: self.rows], values[: self.rows]
            for cache, states in ((keys, key_states), (values, value_states)):
                index = slots[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
                cache.scatter_(2, index, states)
        else:
            # scattered rows (prefill): advanced indices on dims 0 and 2
            index = self.row_index.to(device)
            rows = index[:, None]
            keys[rows, :, slots] = key_states.transpose(1, 2)
            values[rows, :, slots] = value_states.transpose(1, 2)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
        if self.visible is not None:
            return keys[:, :, : self.visible], values[:, :, : self.visible]
        return keys, values

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads, device = key_states.shape[1], key_states.device
        for store, states in ((self.keys, key_states), (self.values, value_states)):
            store.append(
                torch.zeros(
                    (self.max_batch, heads, self.capacity, states.shape[-1]),
                    dtype=states.dtype,
                    device=device,
                )
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # unused: every forward passes cache_position / position_ids explicitly

    def move_rows_to_front(self, rows: torch.Tensor) -> None:
        """Rows ``rows`` (in that order) become rows 0..len-1 of every layer."""
        n = rows.numel()
        for tensor in (*self.keys, *self.values):
            tensor[:n] = tensor.index_select(0, rows.to(tensor.device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
