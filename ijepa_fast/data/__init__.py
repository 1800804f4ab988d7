"""Data: IDX files and image folders read on the CPU (``loader``), and the DALI pipeline (``dali``).

    check_data_source(cfg.data)                      # before any model is built
    loader = build_pretrain_loader(cfg.data, grid=14, mask_kwargs={...}, seed=0, start_step=step)
    for batch in loader:  # Batch: images [B, 3, S, S], labels [B], masks, step, epoch, skipped
        ...
    ds = build_eval_dataset(cfg.data, split="test")  # (image [3, S, S], label), centre crop

Modules: ``idx`` (IDX files), ``folder`` (scan and decode to RGB), ``transforms`` (seeded
RandomResizedCrop, centre crop, normalisation), ``sources`` (the raw dataset of a config, its check,
substitutes for undecodable files), ``loader`` (pretraining: sampler, dataset, collate, loader),
``evaluation`` (centre-cropped evaluation images),
``wds`` (webdataset tars: layout, DALI index files, the CPU loader's source), ``shard`` (image folder
-> webdataset shards, ``ijepa-shard``).
"""

from ijepa_fast.data.evaluation import EvalDataset, build_eval_dataset
from ijepa_fast.data.folder import ImageFolderDataset, load_rgb, scan_folder
from ijepa_fast.data.idx import IdxDataset, IdxFormatError, read_idx, write_idx
from ijepa_fast.data.loader import Batch, PretrainLoader, StepBatchSampler, build_pretrain_loader
from ijepa_fast.data.sources import check_data_source

__all__ = [
    "Batch",
    "EvalDataset",
    "IdxDataset",
    "IdxFormatError",
    "ImageFolderDataset",
    "PretrainLoader",
    "StepBatchSampler",
    "build_eval_dataset",
    "build_pretrain_loader",
    "check_data_source",
    "load_rgb",
    "read_idx",
    "scan_folder",
    "write_idx",
]
