"""What a printed likelihood says about itself: protocol, unit, and what good looks like."""

from __future__ import annotations

from vae.likelihood import likelihood_protocol, likelihood_reference, likelihood_unit


def test_the_binarised_protocol_names_k_the_images_the_draw_and_the_anchors():
    text = likelihood_protocol("bce", "dynamic", 1000, 500)
    assert text.startswith("IW bound, k=1,000, first 500 test images binarised once with a fixed seed; nats per image")
    assert "86.8" in likelihood_reference("bce", "dynamic") and "lower is better" in likelihood_reference("bce", "dynamic")


def test_the_mse_decoder_is_named_with_its_constant_and_its_trainer_numbers_are_not_nats():
    assert "Gaussian (MSE) decoder, including its 720.4-nat constant" in likelihood_protocol("mse", "none", 8)
    assert "all test images" in likelihood_protocol("mse", "none", 8)
    assert "not nats" in likelihood_unit("mse", "none", trainer=True)
    assert likelihood_unit("bce", "dynamic", trainer=True) == likelihood_unit("bce", "dynamic")
    assert "86.8" not in likelihood_reference("mse", "none")
