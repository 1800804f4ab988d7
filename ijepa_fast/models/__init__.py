"""Models: the ViT encoder, the I-JEPA predictor and the attention backends."""
