"""b2txt: a reproducible brain-to-text pipeline.

Neural features (512 per 20 ms bin, one HDF5 file per session and split) are turned into
41 phoneme logits by a GRU with per-day input layers, then into text by language models.
Each stage is one command of the ``b2txt`` CLI (see ``b2txt --help``).
"""

__version__ = "0.1.0"
