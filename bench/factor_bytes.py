"""Bytes a method's factorizations hold between factorizing and the cells, before and after compaction.

From shapes alone (no weights): a Llama-2-7B-shaped layer set (32 blocks x
q, k, v, o 4096x4096, gate and up 11008x4096, down 4096x11008), for svd,
svd-llm, asvd, fwsvd and lord (sfsd holds what lord holds). "before" is what
the code held until compaction (float64 U, s, Vt of r = min(m, n) directions;
svd-llm's dense n x n S^-1; asvd's and fwsvd's channel scales as a dense
n x n diagonal; lord's U a slice of the m x m eigenvector matrix, which keeps
all of it alive, and U^T W); "vector" is the same with the diagonal kept as a
vector; "compact" is ``Factorization.compact`` as the session calls it: the
folded factors A (m, K), B (K, n) in the storage dtype, K the largest rank a
cell can choose (break-even (mn - 1) // (m + n) under params, bytes and bits
targets; round(0.9 r) under a ``rank = 0.9`` target). The error curves (r + 1
Python floats per matrix, about 32 bytes each) are the same before and after
and not counted. "disk" is what ``[factorization] keep = "disk"`` writes
instead (``harness.factorfiles``): the compact factors, each group's error
curve (float64) and a header of about 600 bytes per file.

``--measure`` checks the arithmetic on real full-width matrices on the CPU:
the svd plugin (float64, gram) on random 7B-shaped weights, the bytes of the
tensor storages each factorization keeps alive, before and after the session's
compaction (float32), against the figures computed from the shapes: one
matrix of each of the three shapes (about 2 minutes on 2 cores), or with
``--whole-block`` all seven of a block (about 5 minutes).

    python bench/factor_bytes.py
    python bench/factor_bytes.py --measure --whole-block --threads 2 --json bench/results/factor-bytes-cpu.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_common_arguments, machine, new_parser, script_main  # noqa: E402

BLOCKS = 32
BLOCK = {  # name: (m, n), count per block
    "q_proj": ((4096, 4096), 1),
    "k_proj": ((4096, 4096), 1),
    "v_proj": ((4096, 4096), 1),
    "o_proj": ((4096, 4096), 1),
    "gate_proj": ((11008, 4096), 1),
    "up_proj": ((11008, 4096), 1),
    "down_proj": ((4096, 11008), 1),
}
METHODS = ("svd", "svd-llm", "asvd", "fwsvd", "lord")
F64, F32 = 8, 4
GIB = 2**30


def break_even(m: int, n: int) -> int:
    return (m * n - 1) // (m + n)


def before(method: str, m: int, n: int, diagonal_as_vector: bool = False) -> int:
    """Bytes the uncompacted factorization of one m x n weight keeps alive (float64)."""
    r = min(m, n)
    if method == "lord":  # U: a slice of the m x m eigenvector matrix; U^T W (r, n)
        return (m * m + r * n) * F64
    held = m * r + r + r * n  # U, s, Vt
    if method == "svd-llm":
        held += n * n  # S^-1, dense lower-triangular
    elif method in ("asvd", "fwsvd"):
        held += n if diagonal_as_vector else n * n
    return held * F64


def compact(m: int, n: int, rank: int, dtype_bytes: int = F32) -> int:
    """Bytes of the compacted factorization: A (m, rank) and B (rank, n)."""
    return rank * (m + n) * dtype_bytes


def disk(m: int, n: int, rank: int, dtype_bytes: int = F32) -> int:
    """Bytes of one group's file under ``keep = "disk"``: the compacted factors, the float64 error curve
    (min(m, n) + 1 values) and about 600 bytes of header (``harness.factorfiles``)."""
    return compact(m, n, rank, dtype_bytes) + (min(m, n) + 1) * F64 + 600


def layer_set() -> list[tuple[int, int]]:
    return [shape for _ in range(BLOCKS) for shape, count in BLOCK.values() for _ in range(count)]


def table() -> dict:
    shapes = layer_set()
    rows = {}
    for method in METHODS:
        rows[method] = {
            "before": sum(before(method, m, n) for m, n in shapes),
            "vector": sum(before(method, m, n, True) for m, n in shapes),
            "compact_f32": sum(compact(m, n, break_even(m, n)) for m, n in shapes),
            "compact_f64": sum(compact(m, n, break_even(m, n), F64) for m, n in shapes),
            "rank_0.9_f32": sum(compact(m, n, round(0.9 * min(m, n))) for m, n in shapes),
            "disk_f32": sum(disk(m, n, break_even(m, n)) for m, n in shapes),
        }
    return rows


def held_bytes(fact) -> int:
    """Bytes of the distinct tensor storages among ``fact``'s attributes (what it keeps alive)."""
    seen, total = set(), 0
    for value in vars(fact).values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def measure(whole_block: bool = False) -> dict:
    """Full-width matrices (one per shape, or a whole block): the svd plugin's factorizations, bytes before and
    after the session's compaction."""
    from harness_allocators import Uniform
    from harness_svd import SVD

    import harness
    from harness.factorfiles import MethodFiles, disk_bytes
    from harness.run.factors import keep

    ctx = harness.FactorizeContext(seed=0, device=torch.device("cpu"), log=lambda msg: None)
    gen = torch.Generator().manual_seed(0)
    targets, allocators = [harness.Target("params", 0.8), harness.Target("params", 0.5)], [Uniform()]
    rows = {}
    names = list(BLOCK) if whole_block else ["q_proj", "gate_proj", "down_proj"]
    for name in names:
        (m, n), _ = BLOCK[name]
        W = torch.randn(m, n, generator=gen) * torch.arange(1, n + 1).float().pow(-0.5)
        started = time.perf_counter()
        fact = SVD().factorize({name: W}, {}, SVD.Options(), ctx)
        seconds = time.perf_counter() - started
        held = held_bytes(fact)
        kept = keep(fact, targets, allocators, "float32")
        with tempfile.TemporaryDirectory() as folder:  # the group's file under keep = "disk"
            store = MethodFiles(Path(folder), {"bench": name}, {"harness_svd"})
            store.finish([store.put(kept)], seconds)
            on_disk = disk_bytes(Path(folder)) - store.manifest.stat().st_size
        rows[name] = {
            "shape": [m, n],
            "factorize_s": seconds,
            "before": held,
            "before_computed": before("svd", m, n),
            "compact": held_bytes(kept),
            "compact_computed": compact(m, n, break_even(m, n)),
            "stored_rank": kept.stored_rank,
            "disk": on_disk,
            "disk_computed": disk(m, n, break_even(m, n)),
        }
        del fact, kept
    return rows


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    outcome = {"machine": machine(), "blocks": BLOCKS, "shapes": {k: v[0] for k, v in BLOCK.items()}, "table": table()}
    if args.measure:
        outcome["measured_block"] = measure(args.whole_block)
    return outcome


def render(outcome: dict) -> str:
    lines = [
        f"Llama-2-7B-shaped layer set ({outcome['blocks']} blocks), GiB held by one method's factorizations",
        "",
        "| method | before (float64) | diagonal as vector | compact, float32 | compact, float64 | rank 0.9, float32 |"
        " disk, float32 | before / compact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("before", "vector", "compact_f32", "compact_f64", "rank_0.9_f32", "disk_f32")
    for method, row in outcome["table"].items():
        cells = [f"{row[k] / GIB:.1f}" for k in keys]
        lines.append(f"| {method} | {' | '.join(cells)} | {row['before'] / row['compact_f32']:.1f}x |")
    if "measured_block" in outcome:
        lines += [
            "",
            "Full-width matrices measured (svd, float64 gram; compacted to break-even, float32), MB:",
            "",
            "| matrix | shape | factorize s | before | computed | compact | computed | stored rank | file | computed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in outcome["measured_block"].items():
            m, n = row["shape"]
            lines.append(
                f"| {name} | {m}x{n} | {row['factorize_s']:.1f} | {row['before'] / 1e6:.1f} | "
                f"{row['before_computed'] / 1e6:.1f} | {row['compact'] / 1e6:.1f} | "
                f"{row['compact_computed'] / 1e6:.1f} | {row['stored_rank']} | {row['disk'] / 1e6:.1f} | "
                f"{row['disk_computed'] / 1e6:.1f} |"
            )
    return "\n".join(lines)


def parse():
    parser = new_parser(__doc__)
    parser.add_argument("--measure", action="store_true", help="measure full-width matrices on the CPU (svd)")
    parser.add_argument("--whole-block", action="store_true", help="with --measure: all seven matrices of a block")
    add_common_arguments(parser)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(script_main(parse, run, render))
