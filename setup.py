"""Package definition for ijepa_fast, its Triton kernels (``ijepa_fast.kernels``, kept in the
repository's top-level ``kernels/`` folder) and its configs.

setup.py keeps version ranges for users; CI installs the exact versions of ``requirements-lock.txt``
(``make lock`` refreshes it, and ``tests/test_dependencies.py`` checks that the two agree). torch is
capped at 2.13.0: the CPU machines install the local 2.13.0 CPU wheel (the ``cpu`` extra), and the
GPU machines run the code on their own torch 2.11.
"""

from setuptools import find_packages, setup

setup(
    name="ijepa_fast",
    version="0.1.0",
    description="Fast, faithful I-JEPA pretraining: Triton kernels, SDPA/FlashAttention ViTs, DeepSpeed ZeRO, DALI",
    license="MIT",
    python_requires=">=3.10",
    packages=[*find_packages(include=["ijepa_fast", "ijepa_fast.*"]), "ijepa_fast.kernels", "ijepa_fast.configs"],
    # The kernels live in the top-level kernels/ folder, a namespace portion (no __init__.py), so that a
    # checkout's root on sys.path never shadows an installed distribution named ``kernels`` (Hugging
    # Face's kernel hub, which transformers imports). ijepa_fast/kernels is a link to it, which is how
    # an editable install and a bare checkout find ``ijepa_fast.kernels``; a wheel copies the files.
    # The configs ship as package data, so `--config demo` works from any folder.
    package_dir={"ijepa_fast.kernels": "kernels", "ijepa_fast.configs": "configs"},
    package_data={"ijepa_fast.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.11,<=2.13.0",
        "numpy>=1.24",
        "pillow>=9",
        "pyyaml>=6",
        "tqdm>=4.60",
        # On by default: TensorBoard events and the loss/curve plots of every run, safetensors for
        # `ijepa-export` (its default format and the Hugging Face folder).
        "tensorboard>=2.12",
        "matplotlib>=3.6",
        "safetensors>=0.4",
        # The CPU loader's JPEG decode at reduced DCT scale (Pillow's draft stands in when it is missing).
        "simplejpeg>=1.8",
    ],
    extras_require={
        # The CPU build of torch that the CPU machines (and CI) install from their local disk.
        "cpu": ["torch==2.13.0"],
        # The engine's patches of DeepSpeed internals are written against this one version.
        "gpu": ["triton>=3.2", "deepspeed==0.19.8", "nvidia-dali-cuda130>=2.0"],
        "flash": ["flash-attn>=2.6"],
        "xformers": ["xformers>=0.0.28"],
        "timm": ["timm>=1.0"],
        "wandb": ["wandb>=0.31"],
        # speed.fp8_target: torchao's float8 tensors (a private-ish API: capped at the release it was
        # written against)
        "fp8": ["torchao>=0.18,<0.19"],
        "dev": ["ruff==0.17.6"],
        # What `make test` needs beyond the package (all CPU-capable): DALI runs in its CPU mode,
        # DeepSpeed on gloo, Triton under its interpreter.
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "triton==3.6.0",
            "nvidia-dali-cuda130>=2.0",
            "deepspeed==0.19.8",
            # The Hugging Face IJepa round trip is tested against transformers itself (it needs no torch of its own).
            "transformers>=4.47",
            # Optional W&B logging, tested offline against its own run files (their format is pinned).
            "wandb==0.31.0",
            # speed.fp8_target, tested in torchao's float8 emulation on the CPU.
            "torchao==0.18.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "ijepa-pretrain=ijepa_fast.cli.pretrain:main",
            "ijepa-demo=ijepa_fast.cli.demo:main",
            "ijepa-eval=ijepa_fast.cli.eval:main",
            "ijepa-finetune=ijepa_fast.cli.finetune:main",
            "ijepa-extract=ijepa_fast.cli.export:extract_main",
            "ijepa-export=ijepa_fast.cli.export:export_main",
            "ijepa-bench=ijepa_fast.cli.bench:main",
            "ijepa-shard=ijepa_fast.cli.shard:main",
        ],
    },
)
