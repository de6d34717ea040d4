"""The generated world every stage's tests train and evaluate on (written once per test session)."""
import pytest


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    import synthetic
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.write_all(out, seed=0)
    return out
