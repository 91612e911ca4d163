"""What the e2e modules share: one kfp.local run of the embedded default (light settings), made once per session and
compared against by the other runs (on a GCS emulator, interrupted and resumed, from the compiled YAML)."""
import pytest


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """(run root, stdout) of `python pipeline.py run` with test_embedded_run.LIGHT."""
    import test_embedded_run  # tests/e2e is on sys.path (pytest's rootdir-relative import of these modules)

    root = tmp_path_factory.mktemp("runs")
    return root / "e2e", test_embedded_run.run_pipeline(str(root), "e2e")
