"""PCam download against a local HTTP server serving fixture files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from histoscan.data.download import PCAM_FILES, RemoteFile, download_pcam
from histoscan.data.ingest import ingest
from histoscan.data.store import PatchStore
from histoscan.errors import DataError


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def mirror(pcam_dir: Path, tmp_path: Path) -> Iterator[tuple[str, list[RemoteFile]]]:
    """Gzipped fixture PCam files served on 127.0.0.1, with their real md5s."""
    root = tmp_path / "mirror"
    root.mkdir()
    files = []
    for f in PCAM_FILES:
        plain = pcam_dir / f.name.removesuffix(".gz")
        if f.name.endswith(".gz"):
            with plain.open("rb") as a, gzip.open(root / f.name, "wb") as b:
                shutil.copyfileobj(a, b)
        else:
            shutil.copy(plain, root / f.name)
        files.append(RemoteFile(f.name, hashlib.md5((root / f.name).read_bytes()).hexdigest(), f.split))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", files
    finally:
        server.shutdown()
        server.server_close()


def test_only_the_asked_splits_and_meta_files_are_fetched(mirror: tuple[str, list[RemoteFile]], tmp_path: Path) -> None:
    url, files = mirror
    got = download_pcam(tmp_path / "a", base_url=url, files=files, splits=["valid"], meta=False)
    assert sorted(p.name for p in got) == [
        "camelyonpatch_level_2_split_valid_x.h5.gz",
        "camelyonpatch_level_2_split_valid_y.h5.gz",
    ]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in got)  # nothing else
    got = download_pcam(tmp_path / "b", base_url=url, files=files, splits=["test", "valid"])
    assert len(got) == 6 and {p.name.split("_split_")[1].split("_")[0] for p in got} == {"test", "valid"}


def test_download_then_ingest(mirror: tuple[str, list[RemoteFile]], tmp_path: Path) -> None:
    url, files = mirror
    got = download_pcam(tmp_path / "pcam", base_url=url, files=files)
    assert len(got) == 9 and all(p.exists() for p in got)
    assert not list((tmp_path / "pcam").glob("*.part"))
    store = PatchStore(ingest(tmp_path / "pcam", tmp_path / "store").store)
    assert len(store) == 100 and store.groups is not None
    # a second call keeps verified files and downloads nothing
    again = download_pcam(tmp_path / "pcam", base_url="http://127.0.0.1:9/", files=files)
    assert again == got


def test_md5_mismatch_is_an_error_and_leaves_nothing(mirror: tuple[str, list[RemoteFile]], tmp_path: Path) -> None:
    url, files = mirror
    wrong = [RemoteFile(f.name, "0" * 32, f.split) for f in files]
    with pytest.raises(DataError, match="md5 mismatch"):
        download_pcam(tmp_path / "pcam", base_url=url, files=wrong, splits=["valid"])
    assert list((tmp_path / "pcam").iterdir()) == []


def test_unreachable_server_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download failed"):
        download_pcam(tmp_path / "p", base_url="http://127.0.0.1:9/", splits=["valid"])
    with pytest.raises(DataError, match="unknown PCam split"):
        download_pcam(tmp_path / "p", splits=["validation"])


def test_cli_download_checks_md5_against_the_official_sums(
    mirror: tuple[str, list[RemoteFile]], tmp_path: Path
) -> None:
    """The fixture files are not the real PCam files, so the CLI (official md5s) must refuse them."""
    from typer.testing import CliRunner

    from histoscan.cli import app

    url, _ = mirror
    res = CliRunner().invoke(app, ["download", "pcam", str(tmp_path / "p"), "--base-url", url, "--splits", "valid"])
    assert res.exit_code == 2 and "md5 mismatch" in res.output
    assert not list((tmp_path / "p").glob("*.h5.gz"))
