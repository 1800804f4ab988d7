"""Package definition for ijepa_fast (the library) and kernels (its Triton kernels).

torch is capped at 2.13.0: the CPU machines install the local 2.13.0 CPU wheel (the Makefile
installs it first), and the GPU machines run the code on their own torch 2.11.
"""
from setuptools import find_packages, setup

setup(
    name="ijepa_fast",
    version="0.1.0",
    description="Fast, faithful I-JEPA pretraining: Triton kernels, SDPA/FlashAttention ViTs, DeepSpeed ZeRO, DALI",
    python_requires=">=3.10",
    packages=find_packages(include=["ijepa_fast", "ijepa_fast.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.11,<=2.13.0",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "gpu": ["triton", "deepspeed>=0.19", "nvidia-dali-cuda130"],
        "dev": ["pytest", "hypothesis", "ruff", "matplotlib", "tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "ijepa-pretrain=ijepa_fast.pretrain:main",
            "ijepa-demo=ijepa_fast.demo:main",
            "ijepa-eval=ijepa_fast.eval.cli:main",
            "ijepa-extract=ijepa_fast.interop:extract_main",
            "ijepa-export=ijepa_fast.interop:export_main",
            "ijepa-bench=ijepa_fast.bench:main",
        ],
    },
)
