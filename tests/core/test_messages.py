"""What a user reads: progress that counts a shard group's own shards, plain progress lines in a log (no carriage
returns, no escape codes), and one line, not a traceback, when the embedded web's port is taken."""
from __future__ import annotations

import http.server
import socket

import pyarrow as pa
import pytest

from cnpipe import progress, stage
from cnpipe.dataset import ShardedOutput, ShardResult

SCHEMA = pa.schema([("id", pa.string())])


def three_shards(uri: str):
    out = ShardedOutput(uri, "seeds", "h", SCHEMA)
    for i in range(3):
        out.commit(f"s{i}", ShardResult(pa.table({"id": [f"{i}-{j}" for j in range(4)]}, schema=SCHEMA)), rows_in=4)
    return out.finalize([f"s{i}" for i in range(3)], inputs=[])


def run_group(source, out: str, group: int | None):
    stage.set_part(*((group, 3) if group is not None else (0, 1)))
    try:
        return stage.run_per_shard("copy", [source], out, "h", SCHEMA, lambda table, _: ShardResult(table))
    finally:
        stage.set_part(0, 1)


def test_a_shard_group_counts_only_its_own_shards(tmp_path, capsys):
    source, out = three_shards(str(tmp_path / "in")), str(tmp_path / "out")
    run_group(source, out, 0)
    run_group(source, out, 2)
    capsys.readouterr()
    run_group(source, out, 1)  # a fresh group, while two others' shards are done
    assert "0/1 shards already done" in capsys.readouterr().err
    run_group(source, out, 1)
    assert "1/1 shards already done" in capsys.readouterr().err
    run_group(source, out, None)  # the final, unpartitioned pass sees all of them
    assert "3/3 shards already done" in capsys.readouterr().err


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    """stderr here is not a terminal (captured), as in a pod or a redirected log."""
    run_group(three_shards(str(tmp_path / "in")), str(tmp_path / "out"), None)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err and err.endswith("\n")
    lines = [line for line in err.splitlines() if line.startswith("[copy]")]
    assert lines[0].startswith("[copy] 4/12 rows (33%)") and "left" in lines[0] and "0/3 shards already done" in lines[0]
    assert lines[-1].startswith("[copy] 12/12 rows (100%)") and "done in 0:00:00" in lines[-1]


def test_a_log_gets_a_progress_line_now_and_then_not_per_update(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 3600.0)
    bar = progress.bar("stage", total=None)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[stage] 1 rows") and lines[1].startswith("[stage] 1000 rows")


def test_a_taken_port_falls_back_in_one_line_without_a_traceback(capsys):
    from orchestration import local_web

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = local_web.listen(http.server.BaseHTTPRequestHandler, port)
        try:
            assert server.server_address[1] not in (0, port)
        finally:
            server.shutdown()
            server.server_close()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"port {port} is taken: serving on {server.server_address[1]} instead")


def test_another_socket_error_is_one_line_too(monkeypatch):
    from orchestration import local_web

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(local_web.knn_service, "serve", refused)
    with pytest.raises(SystemExit, match="cannot serve on 127.0.0.1:80: Permission denied"):
        local_web.listen(http.server.BaseHTTPRequestHandler, 80)
