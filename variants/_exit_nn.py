"""Torch modules the exit adapters and the dynamic runner share: chained stages and a
stage prefix with one exit head (what head training distils into).

Imported only where torch is already needed (``import variants`` stays torch-free).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from variants.recover import _as_tuple


class Chain(nn.Module):
    """Run modules in turn, passing a tuple state (the dynamic runner's segments)."""

    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, *state):
        for part in self.parts:
            state = _as_tuple(part(*state))
        return state[0] if len(state) == 1 else state


class StagedExit(nn.Module):
    """Prefix of the dynamic runner's stages plus one exit head (for head training)."""

    def __init__(self, stages: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.stages, self.head = nn.ModuleList(stages), head

    def forward_features(self, *inputs):
        state = inputs
        for stage in self.stages:
            state = _as_tuple(stage(*state))
        return state

    def forward_head(self, *state):
        return self.head(*state)

    def head_parameters(self):
        return self.head.parameters()

    def forward(self, *inputs):
        return self.forward_head(*self.forward_features(*inputs))
