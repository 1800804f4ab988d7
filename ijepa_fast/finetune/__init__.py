"""Full fine-tuning of a pretrained encoder (``ijepa-finetune``): ``recipe`` (the settings, the
classifier, layer-wise lr decay), ``run`` (the run folder, loop, checkpoints and resume), ``report``.

from ijepa_fast.io.load import load_encoder
from ijepa_fast.finetune import FinetuneConfig, Finetuner

loaded = load_encoder("runs/demo", "target_encoder")
result = Finetuner(loaded, FinetuneConfig(data="/usr/share/datasets/fashion-mnist", epochs=2), "ft").fit()
print(result.top1)
"""

from ijepa_fast.finetune.recipe import Classifier, FinetuneConfig, layer_decay_groups
from ijepa_fast.finetune.run import Finetuner, FinetuneResult

__all__ = ["Classifier", "FinetuneConfig", "FinetuneResult", "Finetuner", "layer_decay_groups"]
