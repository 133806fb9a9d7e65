"""Phoneme decoders and running them.

- :mod:`b2txt.models.decoders` — ``GRUDecoder`` (the published baseline) and ``TripleGRUDecoder``;
- :mod:`b2txt.models.transforms` — smoothing and the training augmentations;
- :mod:`b2txt.models.checkpoint` — model directories in the published layout, safe loading;
- :mod:`b2txt.models.inference` — logits of a split; :mod:`b2txt.models.streaming` — online decoding.
"""
