import pytest


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here (pytest's default pattern is test_*.py; pyproject's settings are shared with
    python_tests/, so the pattern is widened only for this folder). A file named on the command line is collected by
    pytest itself: collecting it here too would run its tests twice."""
    named = parent.session.isinitpath(file_path)
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not named:
        return pytest.Module.from_parent(parent, path=file_path)
    return None
