"""Tabulate and plot benchmark prediction files: task x length x attention, star / global ratio.

Examples:
    python scripts/results_table.py --dir runs/ --out results/ruler
    python scripts/results_table.py --run attention=star,path=star.jsonl --run attention=ring,path=ring.jsonl --out t
"""

from star_lightning.results import main

if __name__ == "__main__":
    raise SystemExit(main())
