"""Inference copies of a network with each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm that follows a convolution is a per-channel affine map, so the convolution's weight and
bias can absorb it (``torch.nn.utils.fusion.fuse_conv_bn_weights``), and the activation after it can then work in
place. On CPU that removes the BatchNorm passes and the activations' new buffers, about a fifth of the deployed
ensemble's sliding-window time (benchmarks/README.md). PyTorch's own passes (``torch.fx`` fusion,
``torch.ao.quantization.fuse_modules``) need a symbolically traceable graph or module names, and MONAI has none for
its ``Convolution`` blocks, so :func:`fold_batch_norm` walks ``nn.Sequential`` containers (MONAI's
``Convolution`` is one) for a convolution followed by an ``ADN`` whose first layer is a BatchNorm.
"""

from __future__ import annotations

import copy
from itertools import chain

import torch
import torch.nn as nn
from monai.networks.blocks import ADN
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from multicure_monai.networks.deform_conv import DeformConv3d

__all__ = ["fold_batch_norm", "FoldedCopy"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, DeformConv3d)
_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _foldable_norm(adn: nn.Module) -> _BatchNorm | None:
    """The BatchNorm an ``ADN`` applies first (with running statistics), else None."""
    if not isinstance(adn, ADN) or not adn._modules:
        return None
    name, first = next(iter(adn._modules.items()))
    if name != "N" or not isinstance(first, _BatchNorm) or first.running_mean is None:
        return None
    return first


def _foldable_pairs(module: nn.Module) -> list[tuple[nn.Module, ADN, _BatchNorm]]:
    """(convolution, ADN, its BatchNorm) for every convolution directly followed, in an ``nn.Sequential``, by an
    ``ADN`` whose first layer is a BatchNorm with running statistics."""
    pairs = []
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq._modules.values())
        for conv, adn in zip(children, children[1:]):
            bn = _foldable_norm(adn)
            if bn is not None and isinstance(conv, _CONV_TYPES + _TRANSPOSED_TYPES):
                pairs.append((conv, adn, bn))
    return pairs


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with every foldable BatchNorm folded into the convolution before it.

    Foldable: inside an ``nn.Sequential`` (MONAI ``Convolution`` included), a convolution (``nn.ConvNd``,
    ``nn.ConvTransposeNd`` or :class:`~multicure_monai.networks.deform_conv.DeformConv3d`) directly followed by a
    MONAI ``ADN`` whose first layer is a BatchNorm with running statistics. The BatchNorm becomes ``nn.Identity``
    and a ReLU of that ``ADN`` runs in place (its input is the convolution's fresh output). The copy computes the
    module's eval-mode function up to float rounding; ``module`` itself is not changed.

    Args:
        module: a network, e.g. ``(B, C_in, H, W, D) -> (B, N, H, W, D)``.

    Returns:
        The folded copy, in eval mode, on the module's device and memory format.
    """
    folded = copy.deepcopy(module).eval()
    for conv, adn, bn in _foldable_pairs(folded):
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
            transpose=isinstance(conv, _TRANSPOSED_TYPES),
        )  # fmt: skip
        conv.weight, conv.bias = weight, bias
        adn.N = nn.Identity()
        act = getattr(adn, "A", None)
        if isinstance(act, nn.ReLU):
            act.inplace = True
    return folded


_PLAIN = (bool, int, float, str, type(None))


def _plain(value: object) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def _state_key(module: nn.Module) -> tuple | None:
    """What the folded copy depends on: every submodule's plain attributes (flags, sizes, ``training``) and hook
    counts, and the identity, storage and version counter of every parameter and buffer. It changes when an
    attribute is set, a hook added, or a tensor replaced or updated in place (an optimizer step,
    ``load_state_dict``, ``.to``). None for inference tensors, which have no version counter."""
    key: list = []
    for m in module.modules():
        attrs = tuple((k, v) for k, v in vars(m).items() if _plain(v))
        key.append((id(m), attrs, len(m._forward_hooks), len(m._forward_pre_hooks)))
    for t in chain(module.parameters(), module.buffers()):
        if t.is_inference():
            return None
        key.append((id(t), t.data_ptr(), t._version))
    return tuple(key)


class FoldedCopy:
    """The :func:`fold_batch_norm` copy of a module, kept until the module's parameters or buffers change.

    :meth:`get` returns the module itself when folding would change what it computes or cannot be tracked: with
    gradients enabled, while tracing or compiling, when any of its submodules is in training mode (BatchNorm
    statistics, dropout), when its tensors are inference tensors, and when it has nothing to fold. The copy is
    rebuilt when the module changes (:func:`_state_key`) and is not pickled (a deep copy of the owner starts with an
    empty cache).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._copy: nn.Module | None = None

    def get(self, module: nn.Module) -> nn.Module:
        """The folded copy of ``module`` (rebuilt when stale), or ``module`` itself (see the class docstring)."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return module  # tracing / compiling: the graph holds the module's own weights
        if any(m.training for m in module.modules()):
            return module
        key = _state_key(module)
        if key is None:
            return module
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():
                self._copy = fold_batch_norm(module) if _foldable_pairs(module) else None
            self._key = key
        return module if self._copy is None else self._copy

    def __getstate__(self) -> dict:
        return {"_key": None, "_copy": None}
