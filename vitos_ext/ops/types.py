"""Result types of the vitos ops."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Compacted(NamedTuple):
    """Output of :func:`vitos_ext.compact_tokens`.

    Attributes:
        hidden: [T', D], dtype of the input: the kept rows (fused means where fusion was asked for), in order.
        position_ids: int64 [P, T']: the kept rows' original position ids (gathered, never renumbered).
        cu_seqlens: int32 [B + 1]: offsets of the compacted sequences (a sequence may be empty).
        kept_index: int64 [T']: source row of each output row (-1 on padding rows of the out_capacity form).
        max_seqlen: int: longest compacted sequence (an upper bound, min(out_capacity, T), in the out_capacity form).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    kept_index: torch.Tensor
    max_seqlen: int
