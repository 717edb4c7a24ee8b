"""Backbones F(c_in x, c_noise(t), c_noise(s), labels) (MLP for vectors, UNet for images), time embeddings,
discriminators, DiffAugment, and the registry of backbones keyed by `model.arch`."""
