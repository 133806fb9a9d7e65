"""Kill tests (issue 15, point 3): SIGKILL a b2txt stage half-way and check what is left.

For the LM build (during lmplz, during build_binary, during the graph) and for stages that write
a directory: the old output is intact (byte for byte) or the new one complete, never a mix; no
child process outlives the killed one (a /proc scan, no psutil); and the next run removes the
killed run's temporary directory (its name carries the dead pid) and completes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers.hostile import digest

from b2txt.ground.config import merge
from b2txt.ground.fileio import OWNER_MARK

ENV = dict(os.environ, B2TXT_PROGRESS="0")
#: A tiny training run (as tests/test_train.py's).
BASE = {
    "seed": 1, "model": {"n_units": 16, "n_layers": 1}, "num_training_batches": 8, "batch_size": 4,
    "days_per_batch": 2, "lr_warmup_steps": 2, "lr_decay_steps": 8, "lr_warmup_steps_day": 2, "lr_decay_steps_day": 8,
    "batches_per_train_log": 2, "batches_per_val_step": 2, "batches_per_checkpoint": 2, "threads": 1,
    "holdout_sessions": [],
}


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(command name, parent pid, state) of ``pid`` from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    state, ppid = text[text.rindex(")") + 2:].split()[:2]
    return name, int(ppid), state


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``: {pid: command name}."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[2] != "Z":
            table[int(entry.name)] = st
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (name, ppid, _) in table.items():
            if ppid == parent and child not in found:
                found[child] = name
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] != "Z"


def wait_until(cond: Callable[[], object], what: str, proc: subprocess.Popen, log: Path,
               limit: float = 300) -> object:
    """Poll ``cond`` until it is truthy; fail if ``proc`` ends first (a guard, not a timing)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)
    pytest.fail(f"no {what} within {limit} s")


def kill_when(argv: list[str], cond: Callable[[int], object], what: str, cwd: Path) -> dict[int, str]:
    """Run ``b2txt ARGV``, SIGKILL it as soon as ``cond(pid)`` holds; assert that no process it
    started survives it. Returns the processes it had started."""
    log = cwd / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "b2txt", *argv], stdout=subprocess.DEVNULL, stderr=err,
                                env=ENV, cwd=cwd)
    try:
        wait_until(lambda: cond(proc.pid), what, proc, log)
        children = descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    deadline = time.monotonic() + 60  # the kernel delivers the children's signal at once; allow a slow machine
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    orphans = {c: n for c, n in children.items() if alive(c)}
    for c in orphans:
        os.kill(c, signal.SIGKILL)
    assert not orphans, f"orphans of the killed b2txt: {orphans}"
    return children


def child_named(name: str) -> Callable[[int], bool]:
    return lambda pid: name in descendants(pid).values()


def temp_dir_of(target: Path) -> Callable[[int], bool]:
    """True once the run ``pid`` has made its temporary sibling of ``target``."""
    return lambda pid: any(p.name.startswith(f".{target.name}.tmp-{pid}@") for p in target.parent.iterdir())


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def b2txt(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "b2txt", *argv], capture_output=True, text=True, env=ENV, cwd=cwd,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# ----------------------------------------------------------------------------- the LM build

@pytest.fixture(scope="module")
def lm_text(tmp_path_factory, lexicon) -> tuple[Path, Path]:
    """A small LM text (the old LM, fast) and a large one (lmplz and build_binary take a while)."""
    root = tmp_path_factory.mktemp("kill_text")
    words = sorted(lexicon.pronunciations)
    rng = random.Random(0)
    small, large = root / "small.txt", root / "large.txt"
    small.write_text("".join(" ".join(rng.choices(words[:300], k=6)) + "\n" for _ in range(300)))
    with large.open("w") as f:
        for _ in range(150_000):
            f.write(" ".join(rng.choices(words, k=rng.randint(4, 12))) + "\n")
    return small, large


@pytest.fixture()
def old_lm(tmp_path, kenlm_dir, lm_text) -> tuple[Path, Path, str]:
    """An LM directory with its graph, as `lm ngram` + `lm graph` made it; and its digest."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"lm": {"kenlm_dir": str(kenlm_dir), "memory": "10%"}}))
    lm = tmp_path / "lm" / "3gram"
    b2txt("lm", "ngram", "--config", str(config), "--text", str(lm_text[0]), "--order", "3", "--out", str(lm),
          cwd=tmp_path)
    b2txt("lm", "graph", "--config", str(config), "--out", str(lm), cwd=tmp_path)
    assert {"lm.arpa", "lm.bin", "TLG.fst", "words.txt", OWNER_MARK} <= {p.name for p in lm.iterdir()}
    return config, lm, digest(lm)


@pytest.mark.parametrize("tool", ["lmplz", "build_binary"])
def test_lm_ngram_killed_during_a_kenlm_tool_leaves_the_old_lm_and_no_process(tool, old_lm, lm_text, tmp_path):
    config, lm, before = old_lm
    argv = ["lm", "ngram", "--config", str(config), "--text", str(lm_text[1]), "--order", "4", "--out", str(lm)]
    children = kill_when(argv, child_named(tool), f"{tool} running", tmp_path)
    assert tool in children.values()
    assert digest(lm) == before, "the old LM directory changed"
    assert leftovers(lm), "the killed run left no temporary directory (was it killed half-way?)"

    # the next run removes the dead run's temporary directory and replaces the LM whole: the old
    # graph does not survive beside the new n-gram
    b2txt(*argv[:4], "--text", str(lm_text[0]), "--order", "2", "--out", str(lm), cwd=tmp_path)
    assert leftovers(lm) == []
    assert {p.name for p in lm.iterdir()} == {"lm.arpa", "lm.bin", OWNER_MARK}
    assert "\\3-grams:" not in (lm / "lm.arpa").read_text()


def test_lm_graph_killed_leaves_the_old_directory_then_rebuilds(old_lm, tmp_path):
    config, lm, before = old_lm
    (lm / "TLG.fst").unlink()  # the graph is rebuilt below; the old directory lacks it on purpose
    before = digest(lm)
    argv = ["lm", "graph", "--config", str(config), "--out", str(lm)]
    kill_when(argv, temp_dir_of(lm), "the graph's temporary directory", tmp_path)
    assert digest(lm) == before
    b2txt(*argv, cwd=tmp_path)
    assert leftovers(lm) == []
    assert (lm / "TLG.fst").is_file() and (lm / "lm.arpa").is_file() and (lm / "lm.bin").is_file()


# ----------------------------------------------------------------------------- stages that write a directory

def test_simulate_killed_leaves_the_old_data_then_replaces_it(tmp_path):
    from helpers.data import SENTENCES

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({"simulate": {"n_sessions": 2, "train_blocks": 1, "val_blocks": 1,
                                                   "test_blocks": 1, "trials_per_block": 3}}))
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump({"simulate": {"n_sessions": 12, "train_blocks": 4, "val_blocks": 2,
                                                "test_blocks": 2, "trials_per_block": 20}}))
    data = tmp_path / "data"
    b2txt("simulate", "--config", str(config), "--out", str(data), "--sentences", str(sentences), cwd=tmp_path)
    before = digest(data)
    argv = ["simulate", "--config", str(big), "--out", str(data), "--seed", "7", "--sentences", str(sentences)]
    kill_when(argv, temp_dir_of(data), "simulate's temporary directory", tmp_path)
    assert digest(data) == before
    b2txt("simulate", "--config", str(config), "--out", str(data), "--seed", "8", "--sentences", str(sentences),
          cwd=tmp_path)
    assert leftovers(data) == [] and digest(data) != before and (data / OWNER_MARK).is_file()


def test_decode_killed_leaves_the_old_output_and_no_worker(template_lm, lexicon, tmp_path):
    from helpers.synthetic import synthetic_logits_file

    logits = synthetic_logits_file(tmp_path / "val.hdf5", lexicon, 400)
    out = tmp_path / "decoded"
    b2txt("decode", "--logits", str(logits), "--lm", str(template_lm), "--out", str(out), "--workers", "1",
          cwd=tmp_path)
    before = digest(out)
    argv = ["decode", "--logits", str(logits), "--lm", str(template_lm), "--out", str(out), "--workers", "2"]
    children = kill_when(argv, lambda pid: len(descendants(pid)) >= 2, "two decoding workers", tmp_path)
    assert len(children) >= 2
    assert digest(out) == before


def test_train_killed_leaves_the_old_model(small_sim, tmp_path):
    data, manifest = small_sim
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": BASE}))
    out = tmp_path / "model"
    argv = ["train", "--config", str(config), "--data", str(data), "--manifest", str(manifest), "--out", str(out),
            "--threads", "1"]
    b2txt(*argv, cwd=tmp_path)
    before = digest(out)
    config.write_text(yaml.safe_dump({"train": merge(BASE, {"num_training_batches": 400, "lr_decay_steps": 400,
                                                            "lr_decay_steps_day": 400, "batches_per_checkpoint": 5})}))
    kill_when(argv, lambda pid: (out.with_name("model.partial") / "checkpoint" / "last_checkpoint").exists(),
              "a resume checkpoint", tmp_path)
    assert digest(out) == before and (out / OWNER_MARK).is_file()


# ----------------------------------------------------------------------------- the swap itself

def test_a_swap_killed_between_its_two_renames_gives_the_old_directory_back(tmp_path, monkeypatch):
    """Where the file system cannot exchange two paths in one step, a swap is two renames; a kill
    between them leaves the target absent, the old directory under a dead pid's name: the next
    writer of that place (or of any sibling) renames it back, and drops the dead run's new one."""
    from b2txt.ground import fileio

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "lm"
    with fileio.atomic_dir(out) as tmp:
        (tmp / "lm.arpa").write_text("old")
    with fileio.atomic_dir(out, keep=lambda name: True) as tmp:  # the two-rename path, completed
        (tmp / "TLG.fst").write_text("graph")
    assert sorted(p.name for p in out.iterdir()) == [OWNER_MARK, "TLG.fst", "lm.arpa"]
    before = digest(out)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has just ended
    prefix = fileio.temp_prefix(out).replace(f"-{os.getpid()}@", f"-{dead}@")
    os.replace(out, tmp_path / (prefix.replace(".tmp-", ".old-") + "x1"))  # the first rename, then the kill
    (tmp_path / (prefix + "x2")).mkdir()  # the dead run's complete new directory, never renamed
    fileio.clean_leftovers(tmp_path / "elsewhere")
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]
