"""Batch assembly: in-memory trial store vs re-opening HDF5 files for every batch.

The published trainer opens the session files for each batch; b2txt loads a split into memory
once (`TrialStore`). Both are timed side by side in one run on the same simulated data; the
ratio is what to compare (these machines are noisy). Also prints the one-off load time and the
memory the store holds (the sum of its arrays).

    python benchmarks/data_loading.py [--data DATA_DIR] [--batches 50] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py

from b2txt.data.store import DayBatchSampler, TrialStore, build_manifest
from b2txt.ground.config import SimulateConfig
from b2txt.models.transforms import pad_batch


def simulated(tmp: Path) -> Path:
    from b2txt.data.corpus import extract_sentences, read_sources
    from b2txt.data.simulate import simulate
    from b2txt.ground.phonemes import Lexicon

    lex = Lexicon.from_cmudict()
    sentences = extract_sentences(read_sources("/usr/share/games/fortunes", ["fortunes"]), lex, 3, 14)
    return simulate(SimulateConfig(n_sessions=6, train_blocks=3, trials_per_block=20), sentences, tmp / "sim", lex)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="Dryad-layout data (default: simulate a small set)")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or simulated(Path(tmp))
        manifest = build_manifest(data)
        t0 = time.perf_counter()
        store = TrialStore.load(data, manifest, "train")
        load_s = time.perf_counter() - t0
        store_mb = sum(f.nbytes + (0 if lab is None else lab.nbytes)
                       for f, lab in zip(store.features, store.labels)) / 2**20
        sampler = DayBatchSampler(store, args.batch_size, 4, seed=0)
        batches = [sampler.next_batch() for _ in range(args.batches)]

        t0 = time.perf_counter()
        for idx in batches:
            pad_batch([store.features[i] for i in idx])
        mem_s = (time.perf_counter() - t0) / args.batches

        rows = store.rows
        t0 = time.perf_counter()
        for idx in batches:  # what a per-batch HDF5 reader does: open, read each trial, close
            feats = []
            for i in idx:
                with h5py.File(Path(data) / rows.at[i, "file"], "r") as f:
                    feats.append(f[rows.at[i, "trial"]]["input_features"][()])
            pad_batch(feats)
        h5_s = (time.perf_counter() - t0) / args.batches

    n_bins = sum(f.shape[0] for f in store.features)
    print(f"train trials: {len(store)}, bins: {n_bins}, feature bytes: {n_bins * 512 * 4 / 2**20:.0f} MiB")
    print(f"one-off store load: {load_s:.2f} s, store holds {store_mb:.0f} MiB")
    print(f"batch of {args.batch_size}: in-memory {1000 * mem_s:.1f} ms, per-batch HDF5 {1000 * h5_s:.1f} ms, "
          f"ratio {h5_s / mem_s:.1f}x")


if __name__ == "__main__":
    main()
