"""Per-stage progress (rows, rate, ETA) that stays readable in a terminal and in a pod's log."""
import sys

from tqdm import tqdm


def bar(stage: str, total: int | None, unit: str = "row") -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=f"[{stage}]",
        unit=unit,
        file=sys.stderr,
        mininterval=0.5 if interactive else 5.0,
        dynamic_ncols=interactive,
        ascii=not interactive,
    )
