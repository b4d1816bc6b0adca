"""The seed's architecture built from plain torch.nn layers, for the benchmarks' reference contenders."""

from __future__ import annotations

from torch import nn

from vae.model import VAE, Conv2d, ConvTranspose2d, OutputConv


def plain_twin(model: VAE) -> VAE:
    """``model`` rebuilt as a user of torch.nn writes it: every ``vae.model.Conv2d`` /
    ``ConvTranspose2d`` / ``OutputConv`` swapped for the ``nn.Conv2d`` / ``nn.ConvTranspose2d`` it
    stands for and ``nn.LeakyReLU(0.2)`` not in place, with the same parameters (its state_dict,
    loaded). The same function; tests/vae/test_model.py checks the layers against these twins."""
    plain = VAE(model.in_channels, model.hidden_dims, model.latent_dim, model.image_size, model.beta)
    for name, module in list(plain.named_modules()):
        if isinstance(module, nn.LeakyReLU):
            layer = nn.LeakyReLU(module.negative_slope)
        elif isinstance(module, ConvTranspose2d):
            layer = nn.ConvTranspose2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                       module.padding, module.output_padding)
        elif isinstance(module, (Conv2d, OutputConv)):
            layer = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer)
    plain.load_state_dict(model.state_dict())
    return plain
