"""The configs that ship with the package: the CPU demo, ViT-S/B recipes and the authors' four experiments
(``ijepa-pretrain --config NAME`` finds them by name)."""
