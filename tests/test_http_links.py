"""SA-1B from its links TSV: tars streamed over HTTP from a local server, as from Meta's CDN."""

import functools
import http.server
import threading
from pathlib import Path

import pytest

from storage.errors import SourceError
from storage.ingest.config import IngestConfig
from storage.ingest.shard import ingest_shard, list_shards
from storage.manifest import read_dataset


@pytest.fixture
def http_root(samples, tmp_path):
    """Serve the sample SA-1B directory on 127.0.0.1; yields (base URL, served directory)."""
    root = Path(samples["sam"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_links_tsv_over_http(http_root, tmp_path):
    base, root = http_root
    links = tmp_path / "sa1b_links.tsv"
    links.write_text("file_name\tcdn_link\n" + "".join(
        f"{p.name}\t{base}/{p.name}?ccb=1-7&oe=67890\n" for p in sorted(root.glob("sa_*.tar"))))
    cfg = IngestConfig(dataset="sam", source=str(links), output_root=str(tmp_path / "out"))
    shards = list_shards(cfg)
    assert [s.name for s in shards] == ["sa_000000", "sa_000001"]
    for shard in shards:
        result = ingest_shard(shard, cfg)
        assert (result.num_ok, result.num_error) == (4, 0)
    rows = read_dataset(cfg.output_root, "sam").to_pylist()
    assert len(rows) == 8 and rows[0]["source_url"].startswith(base) and rows[0]["offset"] > 0


def test_expired_link_is_a_clear_error(http_root, tmp_path):
    base, _ = http_root
    links = tmp_path / "links.tsv"
    links.write_text(f"file_name\tcdn_link\nsa_000009.tar\t{base}/sa_000009.tar?oe=expired\n")
    cfg = IngestConfig(dataset="sam", source=str(links), output_root=str(tmp_path / "out"))
    with pytest.raises(SourceError, match="sa_000009.tar"):
        ingest_shard(list_shards(cfg)[0], cfg)
    assert not (tmp_path / "out" / "manifests" / "sam" / "sa_000009.parquet").exists()
