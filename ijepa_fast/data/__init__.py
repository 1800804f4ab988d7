"""Data: IDX files and image folders on the CPU (``loader``), and the DALI pipeline (``dali``)."""
