"""`b2txt dvc-pin`: published Dryad files (and the 1-gram graph from GitHub) pinned in DVC and brought by
`dvc pull`, checked.

Against the Dryad-shaped server of conftest (`dryad`) with the real `dvc` and `git`: the pins hold
the md5 and size the API lists; a fresh clone's `dvc pull` brings the files from a DVC remote (a
local directory, and a writable HTTP server for team sharing) without asking Dryad, checked
against those md5s; the pretrained DVC stages unpack the pulled archives. Damaged bytes, from
Dryad or from a remote, are refused and leave nothing at the target. The 1-gram directory comes from
the GitHub-shaped server of conftest (`github`: contents API, raw files, Git LFS media host) as one
directory pin, every file checked before any enters the DVC cache.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.dryad_server import DATA_DOI, LM_DOI, Blob, FakeDryad, tar_gz_bytes, zip_bytes
from helpers.github_server import FakeGithub, git_blob_sha, lfs_pointer
from helpers.http_store import http_store
from helpers.project import ROOT, configure, init_dvc, make_project, ran_stages, regenerate_dvc, run

from b2txt.cli import main
from b2txt.data.dryad_api import HttpOptions
from b2txt.data.dvc_pin import read_dir_pin, read_pin
from b2txt.data.fetch import GIT_BLOB_SHA1, file_digest
from b2txt.data.github_api import GithubSource, LfsPointer, list_tree, parse_lfs_pointer
from b2txt.ground.config import REFERENCE_1GRAM
from b2txt.ground.errors import DownloadError
from b2txt.lm.wfst import load_graph

GIT = ["git", "-c", "user.name=b2txt test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
MODEL_ZIP = "t15_pretrained_rnn_baseline.zip"
LM_3GRAM, LM_5GRAM = "languageModel.tar.gz", "languageModel_5gram.tar.gz"
DESCRIPTION = "t15_copyTaskData_description.csv"
PINS = "data/published"


def published(dryad: FakeDryad) -> dict[str, bytes]:
    """A checkpoint zip, both LM tarballs and the description CSV (listed with a sha-256 digest) on the server."""
    files = {
        MODEL_ZIP: zip_bytes({"t15_pretrained_rnn_baseline/checkpoint/args.yaml": b"model: {}\n",
                              "t15_pretrained_rnn_baseline/checkpoint/best_checkpoint": os.urandom(3000)}),
        LM_3GRAM: tar_gz_bytes({"languageModel/TLG.fst": b"fst3", "languageModel/words.txt": b"<eps> 0\n"}),
        LM_5GRAM: tar_gz_bytes({"languageModel_5gram/TLG.fst": b"fst5", "languageModel_5gram/words.txt": b"<eps> 0\n"}),
        DESCRIPTION: b"Date,Post-implant day,Block number,Number of sentences,Corpus,Split\n",
    }
    dryad.datasets[DATA_DOI] = {MODEL_ZIP: Blob(files[MODEL_ZIP]),
                                DESCRIPTION: Blob(files[DESCRIPTION], digest_type="sha-256")}
    dryad.datasets[LM_DOI] = {LM_3GRAM: Blob(files[LM_3GRAM]), LM_5GRAM: Blob(files[LM_5GRAM])}
    return files


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def pin(dryad: FakeDryad, repo: Path, *files: str, check: bool = True, extra: tuple[str, ...] = ()):
    return run(["b2txt", "dvc-pin", "--api-root", dryad.url, "--retries", "0", "--out", PINS,
                *(("--files", *files) if files else ()), *extra], repo, check=check)


def repository(path: Path, remote: str) -> Path:
    """A project with git and DVC as users have it (the repository's .gitignore and cache settings)."""
    project = make_project(path)
    regenerate_dvc(project, pretrained=True)
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    init_dvc(project, *GIT)
    run(["dvc", "remote", "add", "-d", "team", remote], project)
    committed = configparser.ConfigParser()
    committed.read(ROOT / ".dvc" / "config")
    run(["dvc", "remote", "modify", "team", "verify", committed["'remote \"local\"'"]["verify"]], project)
    return project


def cache_objects(repo: Path) -> list[Path]:
    return [p for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()]


def status_clean(repo: Path, *targets: str) -> bool:
    return "up to date" in run(["dvc", "status", *targets], repo).stdout.lower()


# ----------------------------------------------------------------------------- without DVC


def test_pins_hold_what_dryad_lists_and_are_rewritten_only_when_ours(dryad, tmp_path, capsys):
    files = published(dryad)
    out = tmp_path / "pins"
    args = ["dvc-pin", "--api-root", dryad.url, "--out", str(out), "--no-download"]
    assert main([*args, "--files", MODEL_ZIP, LM_3GRAM]) == 0
    doc = yaml.safe_load((out / f"{MODEL_ZIP}.dvc").read_text())
    assert doc["outs"] == [{"md5": md5(files[MODEL_ZIP]), "size": len(files[MODEL_ZIP]), "hash": "md5",
                            "path": MODEL_ZIP}]
    assert doc["meta"]["dryad"]["doi"] == DATA_DOI and doc["meta"]["dryad"]["url"].startswith(dryad.url)
    assert read_pin(out / f"{LM_3GRAM}.dvc")["md5"] == md5(files[LM_3GRAM])
    assert (out / ".gitignore").read_text().splitlines() == [f"/{MODEL_ZIP}", f"/{LM_3GRAM}"]
    assert not dryad.blob_requests(MODEL_ZIP)  # the listing alone: nothing downloaded
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*args, "--files", MODEL_ZIP, LM_3GRAM]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the same listing: the same files

    new = files[MODEL_ZIP] + b"\0"  # Dryad publishes another version
    dryad.datasets[DATA_DOI][MODEL_ZIP] = Blob(new)
    assert main([*args, "--files", MODEL_ZIP]) == 0
    assert read_pin(out / f"{MODEL_ZIP}.dvc")["md5"] == md5(new)
    assert "another version" in capsys.readouterr().err

    foreign = out / f"{LM_3GRAM}.dvc"
    foreign.write_text("outs:\n- md5: 0123\n  path: languageModel.tar.gz\n")
    assert main([*args, "--files", LM_3GRAM]) == 2
    assert "not written by `b2txt dvc-pin`" in capsys.readouterr().err
    assert foreign.read_text().startswith("outs:\n- md5: 0123")
    assert main([*args, "--files", LM_3GRAM, "--force"]) == 0 and read_pin(foreign)["md5"] == md5(files[LM_3GRAM])


def test_a_file_without_an_md5_from_dryad_cannot_be_pinned_without_downloading(dryad, tmp_path, capsys):
    published(dryad)
    assert main(["dvc-pin", "--api-root", dryad.url, "--out", str(tmp_path), "--no-download",
                 "--files", DESCRIPTION]) == 2
    err = capsys.readouterr().err
    assert DESCRIPTION in err and "sha-256" in err and "--no-download" in err
    assert not list(tmp_path.iterdir())


def test_downloading_outside_a_dvc_repository_is_one_clear_error(dryad, tmp_path, capsys):
    published(dryad)
    assert main(["dvc-pin", "--api-root", dryad.url, "--out", str(tmp_path / "pins"), "--files", MODEL_ZIP]) == 2
    assert "not inside of a DVC repository" in capsys.readouterr().err
    assert not (tmp_path / "pins").exists() and not dryad.blob_requests(MODEL_ZIP)


def test_unpack_makes_the_archives_directory(tmp_path, capsys):
    archive = tmp_path / LM_3GRAM
    archive.write_bytes(tar_gz_bytes({"languageModel/words.txt": b"<eps> 0\n"}))
    assert main(["unpack", str(archive), "--out", str(tmp_path / "lm")]) == 0
    assert (tmp_path / "lm/languageModel/words.txt").read_bytes() == b"<eps> 0\n"
    assert main(["unpack", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.zip: no such archive" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- with git and DVC


@pytest.mark.slow
def test_fresh_clone_pulls_the_pinned_files_checked_and_unpacks_them_without_dryad(dryad, tmp_path):
    files = published(dryad)
    origin = repository(tmp_path / "origin", str(tmp_path / "store"))
    pin(dryad, origin)  # every file of both datasets, downloaded into the DVC cache
    for name, data in files.items():
        doc = yaml.safe_load((origin / PINS / f"{name}.dvc").read_text())
        assert doc["outs"][0]["md5"] == md5(data) and doc["outs"][0]["size"] == len(data)  # sha-256 listed: hashed
        assert (origin / PINS / name).read_bytes() == data
    assert sorted(p.name for p in cache_objects(origin)) == sorted(md5(d)[2:] for d in files.values())
    if (origin / PINS / MODEL_ZIP).stat().st_nlink == 1:  # linked from the cache (.dvc/config cache.type)
        assert (origin / PINS / MODEL_ZIP).is_symlink()
    assert status_clean(origin, *[f"{PINS}/{n}.dvc" for n in files])
    assert not any((origin / ".dvc/tmp").glob("b2txt-partial*"))  # nothing left half-downloaded

    ignored = run(GIT + ["status", "--porcelain", "--untracked-files=all", PINS], origin).stdout
    assert sorted(ignored.split()[1::2]) == sorted([f"{PINS}/.gitignore"] + [f"{PINS}/{n}.dvc" for n in files])
    run(GIT + ["add", "-A"], origin)
    run(GIT + ["commit", "-q", "-m", "pins"], origin)
    run(["dvc", "push"], origin)  # no targets: DVC finds the pins under data/ (.gitignore)
    requests = len(dryad.requests)

    clone = tmp_path / "clone"
    run(GIT + ["clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / PINS / MODEL_ZIP).exists()
    r = run(["dvc", "repro", "pretrained/dvc.yaml:unpack_model"], clone, check=False)
    assert r.returncode != 0 and f"{PINS}/{MODEL_ZIP}" in r.stdout + r.stderr  # not pulled yet: named
    run(["dvc", "pull", f"{PINS}/{MODEL_ZIP}.dvc", f"{PINS}/{LM_3GRAM}.dvc"], clone)
    assert (clone / PINS / MODEL_ZIP).read_bytes() == files[MODEL_ZIP]
    assert (clone / PINS / LM_3GRAM).read_bytes() == files[LM_3GRAM]
    assert not (clone / PINS / LM_5GRAM).exists()  # only what was asked for
    assert status_clean(clone, f"{PINS}/{MODEL_ZIP}.dvc", f"{PINS}/{LM_3GRAM}.dvc")
    r = run(["dvc", "repro", "pretrained/dvc.yaml:unpack_model", "pretrained/dvc.yaml:unpack_lm@3gram"], clone)
    assert ran_stages(r.stdout) == {"pretrained/dvc.yaml:unpack_model", "pretrained/dvc.yaml:unpack_lm@3gram"}
    assert (clone / "data/pretrained/t15_pretrained_rnn_baseline/checkpoint/args.yaml").read_bytes() == b"model: {}\n"
    assert (clone / "data/published-lm/3gram/languageModel/TLG.fst").read_bytes() == b"fst3"
    assert len(dryad.requests) == requests  # the clone never asked Dryad


@pytest.mark.slow
def test_damaged_downloads_from_dryad_are_refused_and_leave_nothing(dryad, tmp_path):
    files = published(dryad)
    repo = repository(tmp_path / "repo", str(tmp_path / "store"))
    good = files[MODEL_ZIP]
    corrupted = bytes([good[0] ^ 1]) + good[1:]
    dryad.datasets[DATA_DOI][MODEL_ZIP] = Blob(corrupted, digest=md5(good))  # right md5 listed, wrong bytes sent
    dryad.datasets[LM_DOI][LM_3GRAM] = Blob(files[LM_3GRAM][:-40], digest=md5(files[LM_3GRAM]),
                                            size=len(files[LM_3GRAM]))  # the body ends early
    for name, why in ((MODEL_ZIP, "does not match"), (LM_3GRAM, "bytes")):
        r = pin(dryad, repo, name, check=False)
        assert r.returncode == 2 and name in r.stderr and why in r.stderr, r.stderr
        assert not (repo / PINS / name).exists()
        assert not cache_objects(repo)
    assert not status_clean(repo, f"{PINS}/{MODEL_ZIP}.dvc")  # pinned, but not there
    dryad.datasets[DATA_DOI][MODEL_ZIP] = Blob(good)
    pin(dryad, repo, MODEL_ZIP)
    assert (repo / PINS / MODEL_ZIP).read_bytes() == good and status_clean(repo, f"{PINS}/{MODEL_ZIP}.dvc")


@pytest.mark.slow
def test_team_shares_through_an_http_remote_and_damaged_objects_are_refused(dryad, tmp_path):
    files = published(dryad)
    names = (MODEL_ZIP, LM_3GRAM)
    with http_store(tmp_path / "www") as store:
        alice = repository(tmp_path / "alice", f"{store.url}/dvc")
        pin(dryad, alice, *names)
        run(GIT + ["add", "-A"], alice)
        run(GIT + ["commit", "-q", "-m", "pins and the team remote"], alice)
        run(["dvc", "push"], alice)
        assert {m for m, _ in store.uploads} == {"POST"}  # DVC's http remote uploads with POST by default
        assert sorted(p.name for p in store.files()) == sorted(md5(files[n])[2:] for n in names)

        bob = tmp_path / "bob"
        run(GIT + ["clone", "-q", str(alice), str(bob)], tmp_path)
        run(["dvc", "pull"] + [f"{PINS}/{n}.dvc" for n in names], bob)
        assert all((bob / PINS / n).read_bytes() == files[n] for n in names)
        assert status_clean(bob, *[f"{PINS}/{n}.dvc" for n in names])
        (bob / "notes.txt").write_text("shared by bob\n")  # bob shares a file of his own, with PUT
        run(["dvc", "add", "-q", "notes.txt"], bob)
        run(["dvc", "remote", "modify", "--local", "team", "method", "PUT"], bob)
        run(["dvc", "push", "notes.txt.dvc"], bob)
        assert store.uploads[-1][0] == "PUT"

        model = store.root / "dvc/files/md5" / md5(files[MODEL_ZIP])[:2] / md5(files[MODEL_ZIP])[2:]
        lm = store.root / "dvc/files/md5" / md5(files[LM_3GRAM])[:2] / md5(files[LM_3GRAM])[2:]
        data = model.read_bytes()
        model.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # a flipped bit on the server
        lm.write_bytes(lm.read_bytes()[:-40])  # a truncated upload
        carol = tmp_path / "carol"
        run(GIT + ["clone", "-q", str(alice), str(carol)], tmp_path)
        r = run(["dvc", "pull"] + [f"{PINS}/{n}.dvc" for n in names], carol, check=False)
        assert r.returncode != 0
        assert not any((carol / PINS / n).exists() for n in names)
        assert not cache_objects(carol)


# ----------------------------------------------------------------------------- a GitHub directory (the 1-gram)

ONEGRAM = GithubSource.parse(REFERENCE_1GRAM)
ONEGRAM_DIR = f"{PINS}/{ONEGRAM.name}"


def reference_1gram(github: FakeGithub, files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The 1-gram directory at the configured commit: TLG.fst in Git LFS, words.txt a plain git file."""
    files = files or {"TLG.fst": os.urandom(4000), "words.txt": b"<eps> 0\nA 1\nABOUT 2\n"}
    for name, data in files.items():
        github.add(ONEGRAM.repo, ONEGRAM.commit, f"{ONEGRAM.path}/{name}", data, lfs=name == "TLG.fst")
    return files


def pin_github(github: FakeGithub, repo: Path, check: bool = True, extra: tuple[str, ...] = ()):
    return run(["b2txt", "dvc-pin", "--github", "reference-1gram", "--api-root", github.api_root,
                "--media-root", github.media_root, "--retries", "0", "--out", PINS, *extra], repo, check=check)


def test_git_blob_digest_is_gits_own_and_lfs_pointers_are_read_strictly(tmp_path):
    path = tmp_path / "words.txt"
    path.write_bytes(b"<eps> 0\nA 1\n")
    assert file_digest(path, GIT_BLOB_SHA1) == run(["git", "hash-object", str(path)], tmp_path).stdout.strip()
    data = b"fst bytes"
    assert parse_lfs_pointer(lfs_pointer(data), "x") == LfsPointer(hashlib.sha256(data).hexdigest(), len(data))
    assert parse_lfs_pointer(b"<eps> 0\n", "x") is None
    with pytest.raises(DownloadError, match="TLG.fst: a Git LFS pointer without a sha256 oid"):
        parse_lfs_pointer(b"version https://git-lfs.github.com/spec/v1\noid md5:0123\nsize 9\n", "TLG.fst")


def test_github_sources_are_named_or_given_at_a_full_commit(tmp_path, capsys):
    args = ["dvc-pin", "--out", str(tmp_path / "pins")]
    assert main([*args, "--github", "owner/repo@main:lm"]) == 2
    assert "full 40-hex commit" in capsys.readouterr().err
    assert main([*args, "--github", "1gram"]) == 2
    assert "known: reference-1gram" in capsys.readouterr().err
    assert main([*args, "--github", "reference-1gram", "--no-download"]) == 2
    assert "--no-download apply to Dryad files only" in capsys.readouterr().err
    assert not (tmp_path / "pins").exists()


def test_github_directories_are_listed_through_the_contents_api(github):
    files = reference_1gram(github)
    github.add(ONEGRAM.repo, ONEGRAM.commit, f"{ONEGRAM.path}/sub/notes.txt", b"notes\n")
    listed = list_tree(ONEGRAM, github.api_root, HttpOptions(retries=0))
    assert [(f.relpath, f.size) for f in listed] == [("TLG.fst", len(lfs_pointer(files["TLG.fst"]))),
                                                     ("sub/notes.txt", 6), ("words.txt", len(files["words.txt"]))]
    assert listed[2].sha == git_blob_sha(files["words.txt"])
    at = f"{ONEGRAM.repo}@{ONEGRAM.commit}"
    with pytest.raises(DownloadError, match="not a directory"):
        list_tree(GithubSource.parse(f"{at}:{ONEGRAM.path}/words.txt"), github.api_root, HttpOptions(retries=0))
    with pytest.raises(DownloadError, match="HTTP 404"):
        list_tree(GithubSource.parse(f"{at}:no/such/dir"), github.api_root, HttpOptions(retries=0))


@pytest.mark.slow
def test_the_1gram_pinned_from_github_is_pulled_by_a_fresh_clone_and_decodes(github, tmp_path, template_lm):
    files = reference_1gram(github, {n: (template_lm / n).read_bytes() for n in ("TLG.fst", "words.txt")})
    with http_store(tmp_path / "www") as store:
        alice = repository(tmp_path / "alice", f"{store.url}/dvc")
        configure(alice, lm={"source": "dir", "dir": ONEGRAM_DIR})
        pin_github(github, alice)
        assert {n: (alice / ONEGRAM_DIR / n).read_bytes() for n in files} == files
        assert status_clean(alice, f"{ONEGRAM_DIR}.dvc")  # DVC hashes the directory as the pin says
        meta = read_dir_pin(alice / f"{ONEGRAM_DIR}.dvc")
        assert (meta["repo"], meta["commit"], meta["path"]) == (ONEGRAM.repo, ONEGRAM.commit, ONEGRAM.path)
        tlg, words = meta["files"]
        assert (tlg["digestType"], tlg["digest"]) == ("sha256", hashlib.sha256(files["TLG.fst"]).hexdigest())
        assert tlg["url"].startswith(github.media_root) and tlg["size"] == len(files["TLG.fst"])
        assert (words["digestType"], words["digest"]) == (GIT_BLOB_SHA1, git_blob_sha(files["words.txt"]))
        assert not any((alice / ".dvc/tmp").glob("b2txt-partial*"))
        requests = len(github.downloads())
        before = (alice / f"{ONEGRAM_DIR}.dvc").read_bytes()
        pin_github(github, alice)  # again: the files are in the cache, nothing is downloaded
        assert len(github.downloads()) == requests and (alice / f"{ONEGRAM_DIR}.dvc").read_bytes() == before

        assert f"/{ONEGRAM.name}" in (alice / PINS / ".gitignore").read_text().splitlines()
        run(GIT + ["add", "-A"], alice)
        run(GIT + ["commit", "-q", "-m", "the 1-gram, pinned"], alice)
        run(["dvc", "push", f"{ONEGRAM_DIR}.dvc"], alice)
        bob = tmp_path / "bob"
        run(GIT + ["clone", "-q", str(alice), str(bob)], tmp_path)
        run(["dvc", "pull", ONEGRAM_DIR], bob)
    assert {n: (bob / ONEGRAM_DIR / n).read_bytes() for n in files} == files
    assert status_clean(bob, f"{ONEGRAM_DIR}.dvc")
    assert f'"{ONEGRAM_DIR}.dvc" -> "decode"' in run(["dvc", "dag", "--dot"], bob).stdout  # lm.dir feeds decode
    assert load_graph(bob / ONEGRAM_DIR).words == load_graph(template_lm).words
    assert len(github.downloads()) == requests  # bob never asked GitHub


@pytest.mark.slow
def test_damaged_github_files_are_refused_and_leave_nothing(github, tmp_path):
    files = reference_1gram(github)
    repo = repository(tmp_path / "repo", str(tmp_path / "store"))
    tlg = github.trees[ONEGRAM.repo, ONEGRAM.commit][f"{ONEGRAM.path}/TLG.fst"]
    words = github.trees[ONEGRAM.repo, ONEGRAM.commit][f"{ONEGRAM.path}/words.txt"]
    good = files["TLG.fst"]
    damaged = {  # the first: later runs resume from the words.txt checked (and kept) by the earlier ones
        "git file not its blob": (lambda: setattr(words, "raw", files["words.txt"].replace(b"A", b"B")),
                                  "does not match"),
        "corrupted LFS file": (lambda: setattr(tlg, "media", bytes([good[0] ^ 1]) + good[1:]), "does not match"),
        "LFS file cut short": (lambda: setattr(tlg, "media", good[:-100]), "bytes"),
        "pointer of another file": (lambda: setattr(tlg, "git", lfs_pointer(good + b"!", size=len(good))),
                                    "does not match"),
    }
    for what, (damage, why) in damaged.items():
        tlg.git, tlg.media, words.raw = lfs_pointer(good), good, None
        damage()
        r = pin_github(github, repo, check=False)
        assert r.returncode == 2 and why in r.stderr, (what, r.stderr)
        assert not (repo / ONEGRAM_DIR).exists() and not (repo / f"{ONEGRAM_DIR}.dvc").exists(), what
        assert not cache_objects(repo), what
    tlg.git, tlg.media, words.raw = lfs_pointer(good), good, None
    pin_github(github, repo)
    assert (repo / ONEGRAM_DIR / "TLG.fst").read_bytes() == good and status_clean(repo, f"{ONEGRAM_DIR}.dvc")
