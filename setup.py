"""Package definition for ijepa_fast, its Triton kernels (``ijepa_fast.kernels``, kept in the
repository's top-level ``kernels/`` folder) and its configs.

Every version pin lives here. torch is capped at 2.13.0: the CPU machines install the local 2.13.0
CPU wheel (the ``cpu`` extra), and the GPU machines run the code on their own torch 2.11.
"""

from setuptools import find_packages, setup

setup(
    name="ijepa_fast",
    version="0.1.0",
    description="Fast, faithful I-JEPA pretraining: Triton kernels, SDPA/FlashAttention ViTs, DeepSpeed ZeRO, DALI",
    python_requires=">=3.10",
    packages=[*find_packages(include=["ijepa_fast", "ijepa_fast.*"]), "ijepa_fast.kernels", "ijepa_fast.configs"],
    # A top-level package named ``kernels`` would collide with the PyPI distribution of that name; the
    # configs ship as package data, so `--config demo` works from any folder.
    package_dir={"ijepa_fast.kernels": "kernels", "ijepa_fast.configs": "configs"},
    package_data={"ijepa_fast.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.11,<=2.13.0",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # The CPU build of torch that the CPU machines (and CI) install from their local disk.
        "cpu": ["torch==2.13.0"],
        "gpu": ["triton", "deepspeed==0.19.8", "nvidia-dali-cuda130==2.4.0"],
        "dev": ["ruff==0.17.6", "matplotlib", "tensorboard"],
        # What `make test` needs beyond the package (all CPU-capable): DALI runs in its CPU mode,
        # DeepSpeed on gloo, Triton under its interpreter.
        "test": [
            "pytest",
            "hypothesis",
            "triton==3.6.0",
            "nvidia-dali-cuda130==2.4.0",
            "safetensors",
            "deepspeed==0.19.8",
            # The Hugging Face IJepa round trip is tested against transformers itself (it needs no torch of its own).
            "transformers>=4.47",
            # Optional W&B logging, tested offline against its own run files (their format is pinned).
            "wandb==0.31.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "ijepa-pretrain=ijepa_fast.pretrain:main",
            "ijepa-demo=ijepa_fast.demo:main",
            "ijepa-eval=ijepa_fast.eval.cli:main",
            "ijepa-extract=ijepa_fast.export_cli:extract_main",
            "ijepa-export=ijepa_fast.export_cli:export_main",
            "ijepa-bench=ijepa_fast.bench:main",
        ],
    },
)
