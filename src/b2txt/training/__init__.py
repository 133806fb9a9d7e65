"""Training the phoneme decoders.

- :mod:`b2txt.training.trainer` — the resumable CTC trainer;
- :mod:`b2txt.training.distributed` — data-parallel training (``--nproc``, torchrun, srun);
- :mod:`b2txt.training.calibration` — rapid calibration to a session the model never saw.
"""
