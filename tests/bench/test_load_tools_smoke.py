"""Each load tool of bench/ run for real at its smallest (`python -m bench.NAME` in a subprocess from
the repository root, against real servers it starts on loopback): it exits 0 and prints its report.
bench.load and bench.fastapi_baseline run inside bench.serve."""
import os

import pytest


def tiny(script: str, flags: list[str], report: list[str], long: bool = False):
    """A script, flags for a run of a few seconds, what its report must show; long: only in make test-long."""
    return pytest.param(script, flags, report, id=script, marks=[pytest.mark.long] if long else [])


TINY_RUNS = [
    tiny("serve", ["--seconds", "1", "--warmup-seconds", "0", "--ceiling-seconds", "0.5", "--connections", "2",
                   "--load", "python", "--baseline-workers", "1", "2"],
         ["## Serving (`python -m bench.serve", "| FastAPI + ORT, 1 process |", "| FastAPI + ORT, 2 processes |",
          "| digitserve | 1 |", "Ratio of the medians: digitserve / ", "In-process ceiling", "digitserve reaches"]),
    tiny("overload", ["--connections", "8", "--seconds", "1", "--unloaded-connections", "2", "--no-backoff"],
         ["## Overload (`python -m bench.overload", "| connections | answered/s | accepted/s", "| 8 |",
          "Accepted throughput as a share of the unloaded run's (2 connections"]),
    tiny("soak", ["--valid", "40", "--hostile", "20", "--connections", "4", "--warmup", "40"],
         ["| process | RSS after warm-up MB |", "valid requests not answered 200: 0", "targets", ": met"]),
    tiny("hostile", ["--requests", "100", "--connections", "4"],
         ["100 hostile requests in", "5xx, hangs or transport errors: 0"]),
    tiny("decode_bomb", ["--seconds", "1"], ["/health while bombs were sent (1 s,", "bomb answers {413:"]),
    tiny("exhaustion", ["--seconds", "1", "--megabytes", "2", "--names", "20", "--bomb-megabytes", "64"],
         ["## Exhaustion (`python -m bench.exhaustion", "| attack | measured | target |",
          "| 20 distinct 60 KB names on /models/NAME | 414 each", "rejected: test_set.npz"], long=True),
    tiny("reload_memory", ["--reloads", "2"], ["reload    2:", "2 reloads of svhn-synthetic-cnn in"], long=True),
    tiny("insight", ["--seconds", "1", "--warmup-seconds", "0", "--rounds", "1", "--connections", "2", "--feedback",
                     "12"],
         ["## Production insight", "| prediction log + traces |", "The OTLP sink took", ": exact"], long=True),
]


@pytest.mark.parametrize("script, flags, report", TINY_RUNS)
def test_a_load_tool_runs_tiny_and_reports(cli, scratch, script, flags, report):
    result = cli(f"bench.{script}", *flags, env={**os.environ, "TMPDIR": str(scratch)}, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in report:
        assert text in result.stdout, result.stdout
