"""The bootstrap interval of an aggregate error rate: 10,000 resamples of 1,500 trials.

Figure 2 and the WER summary draw one interval per session and vocabulary; the resampling is one
vectorised numpy call (`b2txt.evaluation.error_rates.bootstrap_ci`), seeded, and must take well under a second
for a val-set-sized table. Prints the median time of a few repeats (the first call, which warms
numpy's allocator, is reported separately) and checks that a seed gives the same interval twice.

    python benchmarks/bootstrap.py [--trials 1500] [--resamples 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from b2txt.evaluation.error_rates import bootstrap_ci


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1500)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ref_len = rng.integers(10, 60, size=args.trials)  # phonemes per sentence
    edits = rng.binomial(ref_len, 0.1)  # about 10 % PER

    def once() -> tuple[float, tuple[float, float]]:
        t0 = time.perf_counter()
        ci = bootstrap_ci(edits, ref_len, n_resamples=args.resamples, seed=0)
        return time.perf_counter() - t0, ci

    first, ci = once()
    times = []
    for _ in range(args.repeats):
        seconds, again = once()
        times.append(seconds)
        assert again == ci, "the same seed gave a different interval"
    median = statistics.median(times)
    rate = edits.sum() / ref_len.sum()
    print(f"bootstrap_ci: {args.resamples:,} resamples of {args.trials:,} trials: "
          f"{1000 * median:.0f} ms (median of {args.repeats}; first call {1000 * first:.0f} ms)")
    print(f"aggregate rate {rate:.4f}, 95 % interval [{ci[0]:.4f}, {ci[1]:.4f}]; "
          f"{'well under' if median < 0.5 else 'NOT under' if median >= 1 else 'under'} a second")


if __name__ == "__main__":
    main()
