"""Networks: autoencoder (VQ-GAN, codebook, SPADE decoder), discriminators, denoisers, LPIPS."""
