"""Real subprocess pipelines: what a shell user does."""
import subprocess
import sys

import orjson
import pytest


def vecpipe_cmd(*args):
    return [sys.executable, "-m", "vecpipe.cli", *map(str, args)]


@pytest.mark.slow
def test_convert_into_head_exits_zero_silently(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"".join(orjson.dumps({"id": str(i), "text": "w " * 50}) + b"\n"
                             for i in range(200_000)))
    producer = subprocess.Popen(vecpipe_cmd("convert", big, "--output-format", "jsonl"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-1"], stdin=producer.stdout, capture_output=True)
    producer.stdout.close()
    stderr = producer.stderr.read()
    assert producer.wait() == 0
    assert stderr == b""
    assert orjson.loads(head.stdout)["id"] == "0"


@pytest.mark.slow
def test_convert_chain_through_arrow_pipe(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"id": str(i)}) + b"\n" for i in range(5000)))
    first = subprocess.Popen(vecpipe_cmd("convert", src), stdout=subprocess.PIPE)
    second = subprocess.run(vecpipe_cmd("convert", "--output-format", "jsonl", "-q"),
                            stdin=first.stdout, capture_output=True)
    first.stdout.close()
    assert first.wait() == 0 and second.returncode == 0
    assert len(second.stdout.splitlines()) == 5000


@pytest.mark.slow
def test_interrupt_exits_130_without_traceback(tmp_path):
    import signal
    import time

    proc = subprocess.Popen(vecpipe_cmd("convert", "-", "--output-format", "jsonl"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert b"Traceback" not in err
