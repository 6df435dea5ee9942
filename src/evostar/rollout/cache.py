"""A KV cache that grows by doubling instead of concatenating at every decode step.

transformers' `DynamicCache` appends each new token's keys and values with `torch.cat`, which
copies the whole cache once per layer and token: quadratic in the response length, and on a CPU
the largest single cost of sampling a small model. `GrowingCache` writes each step in place into a
buffer with spare room (reallocated at twice the size when full) and hands attention a view of the
filled part, so the model sees exactly the tensors a `DynamicCache` would hold.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` are views into a larger preallocated buffer."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        filled = self.get_seq_length()
        old = self._key_buffer.shape[-2] if self._key_buffer is not None else 0
        capacity = max(needed, 2 * old, 64)
        key_buffer = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        value_buffer = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if filled:
            key_buffer[..., :filled, :] = self.keys
            value_buffer[..., :filled, :] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = self.get_seq_length()
        needed = filled + key_states.shape[-2]
        buffer = self._key_buffer
        if buffer is None or needed > buffer.shape[-2] or buffer.shape[:-2] != key_states.shape[:-2]:
            self._grow(needed, key_states, value_states)
        self._key_buffer[..., filled:needed, :] = key_states
        self._value_buffer[..., filled:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _detach_buffers(self) -> None:
        """After an operation that replaced `keys`/`values`, the next update starts a new buffer."""
        self._key_buffer = self._value_buffer = None

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._detach_buffers()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._detach_buffers()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._detach_buffers()


class GrowingCache(DynamicCache):
    """`DynamicCache` with `GrowingLayer`s for every full-attention layer (sliding-window and
    other special layers keep their own classes)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
