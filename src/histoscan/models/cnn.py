"""histoscan's from-scratch CNNs, each registered by name.

They follow timm's split: ``forward_features`` (the conv trunk), ``forward_head``
(pooling, dense layers, classifier), ``get_classifier`` (the last linear layer), and
``feature_layer`` (the last convolution before the final pooling, for Grad-CAM).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from histoscan.models.registry import register_model


def conv_block(
    cin: int, cout: int, kernel: int = 3, convs: int = 1, batch_norm: bool = False, dropout: float = 0.0
) -> nn.Sequential:
    """``convs`` x (conv k x k, [BN], ReLU), then 2x2 max-pool and optional dropout."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, kernel, padding=kernel // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def dense_head(
    in_features: int, units: Sequence[int], dropout: float, num_outputs: int
) -> tuple[nn.Sequential, nn.Linear]:
    """Dense layers (ReLU, dropout after each) and the final classifier."""
    layers: list[nn.Module] = []
    prev = in_features
    for u in units:
        layers += [nn.Linear(prev, u), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        prev = u
    classifier = nn.Linear(prev, num_outputs)
    return nn.Sequential(*layers), classifier


class PatchCNN(nn.Module):
    """A conv trunk plus a pooled or flattened dense head."""

    def __init__(
        self,
        blocks: list[nn.Sequential],
        channels: int,
        units: Sequence[int],
        dropout: float,
        num_outputs: int,
        flatten_size: int | None = None,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(*blocks)
        self.flatten_size = flatten_size
        self.pool = nn.Identity() if flatten_size else nn.AdaptiveAvgPool2d(1)
        in_features = channels * flatten_size * flatten_size if flatten_size else channels
        self.dense, self.classifier = dense_head(in_features, units, dropout, num_outputs)
        self.num_features = channels

    @property
    def feature_layer(self) -> nn.Module:
        """The last convolution's activation, before the final max-pool (Grad-CAM's layer).

        Not the whole last block: that ends in the max-pool, which halves the map (4x4 on a 32 px input).
        """
        last = [m for m in self.features[-1].children() if not isinstance(m, (nn.MaxPool2d, nn.Dropout))]
        return last[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps before the pooling (timm's interface)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dense layers and classifier (``pre_logits``: stop before the classifier)."""
        x = self.dense(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final classifier layer (timm's interface)."""
        return self.classifier


@register_model
def simple_cnn(num_outputs: int = 1, input_size: int = 96, dropout: float = 0.5, batch_norm: bool = False) -> PatchCNN:
    """The seeds' 3-block baseline CNN: conv 32/64/128 (3x3, ReLU, 2x2 max-pool), global average pool, dense 128, dropout."""
    blocks = [
        conv_block(3, 32, batch_norm=batch_norm),
        conv_block(32, 64, batch_norm=batch_norm),
        conv_block(64, 128, batch_norm=batch_norm),
    ]
    return PatchCNN(blocks, 128, [128], dropout, num_outputs)


@register_model
def simple_cnn_flatten(num_outputs: int = 1, input_size: int = 96, dropout: float = 0.5) -> PatchCNN:
    """The same 3 blocks with a flatten head (Keras ``Flatten`` + dense 128), as in the seeds' first notebook."""
    blocks = [conv_block(3, 32), conv_block(32, 64), conv_block(64, 128)]
    return PatchCNN(blocks, 128, [128], dropout, num_outputs, flatten_size=input_size // 8)


@register_model
def custom_cnn(
    num_outputs: int = 1, input_size: int = 96, dropout: float = 0.5, conv_dropout: float = 0.25
) -> PatchCNN:
    """The reference notebooks' deeper custom CNN.

    The seeds' deeper custom CNN (about 2.3 M parameters): three stages of three 3x3 convs with
    32, 64 and 128 filters, batch norm, max-pool and dropout; average-pooled to 4x4, flattened; dense
    768 and 256 with dropout 0.5. The pooling keeps the parameter count independent of the input size
    (for ONNX export the input side must be a multiple of 32: 32, 64, 96, 128, 192, 224 ...).
    """
    blocks = [
        conv_block(3, 32, convs=3, batch_norm=True, dropout=conv_dropout),
        conv_block(32, 64, convs=3, batch_norm=True, dropout=conv_dropout),
        conv_block(64, 128, convs=3, batch_norm=True, dropout=conv_dropout),
    ]
    model = PatchCNN(blocks, 128, [768, 256], dropout, num_outputs, flatten_size=4)
    model.pool = nn.AdaptiveAvgPool2d(4)
    return model


@register_model
def nas_cnn(
    num_outputs: int = 1,
    input_size: int = 96,
    num_blocks: int = 4,
    filter_mult: int = 4,
    kernel_sizes: Sequence[int] = (3, 3, 5, 3),
    batch_norm: bool = False,
    conv_dropout: float = 0.2,
    dense_units: Sequence[int] = (512, 256),
    dense_dropout: float = 0.4,
) -> PatchCNN:
    """A CNN from the architecture-search space.

    A CNN from the architecture-search space (the seeds' NAS): ``num_blocks`` (3-5) stages of two
    k x k convs with ``8 * filter_mult * 2**i`` filters (capped at 512), optional batch norm, max-pool
    and conv dropout; global average pool; dense layers ``dense_units`` with ``dense_dropout``.
    The defaults are the architecture the seeds' search found: 4 blocks, x4 filters, kernels 3,3,5,3, no BN.
    """
    if not 1 <= num_blocks <= 6:
        raise ValueError(f"num_blocks must be 1..6, got {num_blocks}")
    kernels = list(kernel_sizes) + [3] * max(0, num_blocks - len(kernel_sizes))
    blocks, cin = [], 3
    for i in range(num_blocks):
        cout = min(512, 8 * filter_mult * 2**i)
        blocks.append(conv_block(cin, cout, kernels[i], convs=2, batch_norm=batch_norm, dropout=conv_dropout))
        cin = cout
    return PatchCNN(blocks, cin, list(dense_units), dense_dropout, num_outputs)
