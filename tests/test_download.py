"""download_file against a throw-away HTTP server on 127.0.0.1: the file lands whole, a checksum mismatch
raises DataError and leaves neither the destination nor a partial file behind."""
import functools
import hashlib
import http.server
import gzip
import threading

import pytest

import HoloMambaRec as H


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_md5_and_renames_into_place(server, tmp_path):
    root, url = server
    payload = b"PK" + bytes(range(256)) * 5000  # 1.28 MB, several chunks, with a zip archive's first bytes
    (root / "ml-1m.zip").write_bytes(payload)
    dest = tmp_path / "data" / "ml-1m" / "ml-1m.zip"
    H.download_file(f"{url}/ml-1m.zip", dest, hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ml-1m.zip"]


def test_download_with_wrong_md5_leaves_nothing(server, tmp_path):
    root, url = server
    (root / "f.bin").write_bytes(b"abc" * 1000)
    dest = tmp_path / "data" / "f.bin"
    with pytest.raises(H.DataError, match="checksum"):
        H.download_file(f"{url}/f.bin", dest, "0" * 32)
    assert not dest.parent.exists()  # the folder the download created is removed with the temporary file


def test_missing_file_is_downloaded_from_the_official_url(server, tmp_path, monkeypatch):
    """find_dataset_files fetches into data_dir/<name>/ when the file is absent and download is on."""
    root, url = server
    (root / "reviews_Beauty_5.json.gz").write_bytes(gzip.compress(b"r"))
    (root / "meta_Beauty.json.gz").write_bytes(gzip.compress(b"m"))
    monkeypatch.setitem(H.DOWNLOADS, "amazon-beauty", [(name, f"{url}/{name}", None) for name in
                                                      ("reviews_Beauty_5.json.gz", "meta_Beauty.json.gz")])
    cfg = H.resolve_config({"data_dir": str(tmp_path / "d"), "download": True}, "amazon-beauty")
    paths = H.find_dataset_files("amazon-beauty", cfg)
    assert [gzip.decompress(p.read_bytes()) for p in paths] == [b"r", b"m"]
    assert all(p.parent == tmp_path / "d" / "amazon-beauty" for p in paths)


def test_failed_download_names_the_file_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setitem(H.DOWNLOADS, "ml-1m", [("ml-1m.zip", "http://127.0.0.1:9/ml-1m.zip", None)])
    cfg = H.resolve_config({"data_dir": str(tmp_path), "download": True}, "ml-1m")
    with pytest.raises(H.DataError, match=r"ml-1m.zip not found.*download failed.*127.0.0.1:9/ml-1m.zip"):
        H.find_dataset_files("ml-1m", cfg)
    assert not any(tmp_path.rglob("*.part"))


def test_an_error_page_saved_under_an_archive_name_is_refused(server, tmp_path):
    root, url = server
    (root / "meta.json.gz").write_bytes(b"<html><body>503 Service Unavailable</body></html>")
    dest = tmp_path / "data" / "sub" / "meta.json.gz"
    with pytest.raises(H.DataError, match="did not send a gz archive"):
        H.download_file(f"{url}/meta.json.gz", dest)
    assert not (tmp_path / "data").exists()  # nothing half-written, no empty folders left
