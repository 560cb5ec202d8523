"""Diffusion maths: noise schedules, samplers, classifier-free guidance, latent scaling."""
