"""The kNN-Diffusion generator: network, schedule, loss, samplers, Ray Train training."""
