"""Files: the atomic checkpoint writer and the one weights-only loader; import and export of our
checkpoints and of the authors', safetensors, timm and Hugging Face formats."""
