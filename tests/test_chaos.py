"""The chaos soak, small and seeded: a 2-task stream on the session's Ray while a training worker,
the tree-service actor, the MLflow server and the driver are each SIGKILLed once (a seeded
order); the run ends identical to a clean run of the same stream, nothing lost or duplicated.
benchmarks/bench_chaos.py runs the 12-task, >= 20-kill version."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

_spec = importlib.util.spec_from_file_location("bench_chaos", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_chaos.py")
bench_chaos = sys.modules["bench_chaos"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_chaos)


def test_a_stream_killed_four_ways_ends_identical_to_a_clean_run(ray_session, tmp_path, capsys):
    address = ray_session.get_runtime_context().gcs_address
    assert bench_chaos.main(["--tasks", "2", "--kills", "4", "--seed", "3", "--train-size", "32", "--address", address,
                             "--workdir", str(tmp_path), "--budget-s", "480"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = dict(line.split("=", 1) for line in lines[-7:])
    assert all(int(result[f"kills_{kind}"]) >= 1 for kind in ("worker", "tree", "driver", "mlflow")), lines[-12:]
    assert result["identical"] == "1" and result["lost"] == "0", lines[-12:]
