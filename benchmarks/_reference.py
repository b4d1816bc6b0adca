"""The seed's architecture built from plain torch.nn layers, for the benchmarks' reference contenders."""

from __future__ import annotations

from torch import nn

from vae.model import VAE, Conv2d, ConvTranspose2d, Linear, OutputConv


def plain_layer(module: nn.Module) -> nn.Module | None:
    """The torch.nn layer a ``vae.model`` layer stands for, with its parameters (state_dict loaded):
    ``nn.ConvTranspose2d`` / ``nn.Conv2d`` for ``ConvTranspose2d`` / ``Conv2d`` and ``OutputConv``,
    ``nn.Linear`` for ``Linear``, ``nn.LeakyReLU`` not in place for an in-place one; None for any other
    module."""
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.LeakyReLU):
        return nn.LeakyReLU(module.negative_slope)
    if isinstance(module, Linear):
        layer = nn.Linear(module.in_features, module.out_features, bias=bias)
    elif isinstance(module, ConvTranspose2d):
        layer = nn.ConvTranspose2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                   module.padding, module.output_padding, bias=bias)
    elif isinstance(module, (Conv2d, OutputConv)):
        layer = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                          bias=bias)
    else:
        return None
    layer.load_state_dict(module.state_dict())
    return layer.to(module.weight.dtype)


def plain_twin(model: VAE) -> VAE:
    """``model`` rebuilt as a user of torch.nn writes it, every layer swapped for its
    :func:`plain_layer`, with the same parameters. The same function; tests/vae/test_model.py
    checks the layers and the whole model against these twins."""
    plain = VAE(model.in_channels, model.hidden_dims, model.latent_dim, model.image_size, model.beta)
    for name, module in list(plain.named_modules()):
        layer = plain_layer(module)
        if layer is not None:
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, layer)
    plain.load_state_dict(model.state_dict())
    return plain
