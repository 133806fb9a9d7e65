"""Data: the published formats in and out, and the data the pipeline makes itself.

- :mod:`b2txt.data.dryad` — the Dryad HDF5 session files: read, write, check;
- :mod:`b2txt.data.description` — the block description CSV;
- :mod:`b2txt.data.validate` — every file and trial of a data directory checked;
- :mod:`b2txt.data.store` — the trial manifest and the in-memory trial store of training;
- :mod:`b2txt.data.corpus` — English sentences from text; :mod:`b2txt.data.simulate` — the simulator;
- :mod:`b2txt.data.logits` — the logits file; :mod:`b2txt.data.decoded` — decoded sentences;
- :mod:`b2txt.data.dryad_api` and :mod:`b2txt.data.fetch` — the Dryad API and resumable, checked downloads.
"""
