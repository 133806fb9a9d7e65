"""The ground layer, which every other layer may import and which imports none of them.

- :mod:`b2txt.ground.errors` — the errors the CLI turns into one clear message;
- :mod:`b2txt.ground.config` — the typed configuration (one set of defaults);
- :mod:`b2txt.ground.fileio` — atomic outputs; :mod:`b2txt.ground.console` — log lines, progress bars;
- :mod:`b2txt.ground.phonemes` — the 41 classes, LM column order, text normalisation, the CMU lexicon;
- :mod:`b2txt.ground.device` — torch device, bf16, CPU cores; :mod:`b2txt.ground.archive` — safe unpacking.
"""
