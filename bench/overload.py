"""Admission control: single 8x8 PNG uploads at far more connections than the machine can serve.
Targets (2 cores, 512 connections): p99 of the accepted requests <= 200 ms, every other request a
fast 503, none hanging; with clients resending at once, 2,048 connections: accepted throughput >= 70 %
of the unloaded throughput (the same load at `--unloaded-connections`, within --max-queue, first).

    .venv/bin/python -m bench.overload [--connections 512 2048] [--seconds 20] [--tool python|wrk]
                                       [--unloaded-connections 32] [--no-backoff] [-- SERVER FLAGS]

Each connection sends its next request as soon as the last is answered, and, as HTTP clients and
load balancers should, waits the Retry-After of a 503 first (times 1-1.5, the usual jitter that
keeps refused clients from returning all at once; Retry-After is the least a client waits); `--no-backoff` resends at once
(every refused client hammering: the worst case). `--tool wrk` sends the same load from wrk (an
external tool, which resends at once and reports the latency of every answer, 503s included).
Also reports the cores the server's processes and the load generator used (they share the machine)
and the server's CPU time per accepted answer.
"""
import argparse
import resource
import sys

from bench.harness import ROOT, cpu_seconds, process_tree, run_python_load, run_wrk, running_server, upload_body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--backoff", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tool", choices=["python", "wrk"], default="python")
    parser.add_argument("--unloaded-connections", type=int, default=32, help="the reference run (0: none)")
    parser.add_argument("server_flags", nargs="*")
    args = parser.parse_args()
    body = upload_body(ROOT / "exports" / "digits-cnn")
    rows = []
    with running_server(ROOT / "exports", *args.server_flags) as server:
        pids = process_tree(server.process.pid)
        for connections in ([args.unloaded_connections] if args.unloaded_connections else []) + args.connections:
            server_cpu, load_cpu = cpu_seconds(pids), children_cpu_seconds()
            if args.tool == "wrk":
                result = run_wrk(f"{server.url}/predict", body, connections, args.seconds)
            else:
                result = run_python_load(f"{server.url}/predict", body, connections, args.seconds, processes=1,
                                         backoff=args.backoff)
            # The two share the machine's cores: what the load generator takes, the server cannot have.
            result["server_cores"] = (cpu_seconds(pids) - server_cpu) / args.seconds
            result["load_cores"] = (children_cpu_seconds() - load_cpu) / args.seconds
            rows.append((connections, result))
    print(f"## Overload (`python -m bench.overload {' '.join(sys.argv[1:])}`)\n")
    if args.tool == "wrk":  # wrk's latencies are of every answer, accepted or refused
        print("| connections | answered/s | p50 ms (all) | p99 ms (all) | refused (non-2xx) | socket errors "
              "| server cores | load cores |\n|---|---|---|---|---|---|---|---|")
        for connections, r in rows:
            print(f"| {connections} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx']} | "
                  f"{r['socket_errors']} | {r['server_cores']:.2f} | {r['load_cores']:.2f} |")
        return
    print("| connections | answered/s | accepted/s | accepted p50 ms | accepted p99 ms | shed (503) | shed p99 ms "
          "| slowest ms | socket errors | server cores | server CPU ms an accepted answer | load cores |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for connections, r in rows:
        per_accepted = r["server_cores"] / r["ok_rps"] * 1000 if r["ok_rps"] else float("nan")
        print(f"| {connections} | {r['rps']:.0f} | {r['ok_rps']:.0f} | {r['ok_p50']:.1f} | {r['ok_p99']:.1f} | "
              f"{r['shed']} | {r['shed_p99']:.1f} | {r['max']:.0f} | {r['socket_errors']} | {r['server_cores']:.2f} | "
              f"{per_accepted:.3f} | {r['load_cores']:.2f} |")
    if args.unloaded_connections and rows[0][1]["ok_rps"]:
        unloaded = rows[0][1]["ok_rps"]
        shares = ", ".join(f"{connections}: **{r['ok_rps'] / unloaded:.0%}**" for connections, r in rows[1:])
        print(f"\nAccepted throughput as a share of the unloaded run's ({args.unloaded_connections} connections, "
              f"{unloaded:.0f}/s): {shares}.")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have ended: the load generators run so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
