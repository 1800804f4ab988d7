"""ijepa_fast: fast, faithful I-JEPA pretraining.

Importing this package does no work: no device probing, no environment changes, no seeding and no
logging set-up. Import submodules for what you need, e.g. ``from ijepa_fast.models import vit``.
"""

__version__ = "0.1.0"
