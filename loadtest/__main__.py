"""adapterserve loadtest {run,compare,bench} ... (see each subcommand's --help)."""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adapterserve loadtest")
    sub = p.add_subparsers(dest="command", required=True)
    from adapterserve.loadtest import bench
    from adapterserve.loadtest import compare
    from adapterserve.loadtest import run

    run.add_args(sub.add_parser("run", help="load a server, report throughput and latency"))
    compare.add_args(sub.add_parser("compare", help="tables and plots from several run results"))
    bench.add_args(sub.add_parser("bench", help="the benchmark matrix: ceiling, peers, N adapters, mixes"))
    args = p.parse_args(argv)
    return {"run": run.main, "compare": compare.main, "bench": bench.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
