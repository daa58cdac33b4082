"""``fclm-serve`` through its real entry point: starts on loopback, answers, stops; bad options are one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve_fixtures import free_port

from serve.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_program_serves_on_loopback_and_stops_on_sigint(tiny_model_dir, tmp_path):
    port = free_port()
    (tmp_path / "key.txt").write_text("k3y\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--api-key-file", str(tmp_path / "key.txt"), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
                time.sleep(0.2)
        assert health.json()["model"] == Path(tiny_model_dir).name
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in err


def test_bad_options_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    assert main(["--model", str(tmp_path), "--allowed-root", str(tmp_path / "nope")]) == 2
    assert main(["--model", str(tmp_path), "--api-key-file", str(tmp_path / "nokey")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fclm-serve: error:") for line in err)
    assert "fclm_config.json" in err[0] and "no such folder" in err[1] and "no such file" in err[2]
