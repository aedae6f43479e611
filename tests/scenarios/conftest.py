"""One workspace per test session: a run used by several scenarios (the reference) is made once."""

import pytest

from scenarios import Workspace


@pytest.fixture(scope="session")
def workspace(tf_cpus, tmp_path_factory):
    return Workspace(str(tmp_path_factory.mktemp("scenarios")))


@pytest.fixture(scope="session")
def outcome(workspace):
    """``outcome("4a")``: the scenario's runs made (once) and its tracer command's result."""
    from scenarios import by_id

    def get(scenario_id):
        s = by_id(scenario_id)
        return workspace.compare(s.a, s.b, s.options)
    return get
