"""Draw run_all.sh's --json: completions over time, one panel per scenario and endpoint.

    python -m kit.plot RESULTS.json -o FILE.png
    python -m kit.plot docs/knee.json -o docs/knee.png     # bench/knee.py's --json

Every panel shares one time axis, so a setup that blocks stretches across the figure while
one that overlaps finishes at the left edge. A dashed line marks the expected total (a band
where several workers make it a range); the title says whether the run matched it.
bench/knee.py's document is drawn instead as the fast requests' p99 against the offered rate,
one line per setup, one panel per RTT, both axes logarithmic, each setup's measured knee
marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ENDPOINTS = {"python": "time.sleep", "postgres": "SELECT pg_sleep"}


def panels(document: dict) -> tuple[list[str], list[str], dict]:
    """(scenarios, endpoints, {(scenario, endpoint): row}) of the rows that ran."""
    rows = {(r["scenario"], r["endpoint"]): r for r in document["rows"]
            if r.get("finishes_s")}
    scenarios = list(dict.fromkeys(s for s, _ in rows))
    endpoints = [e for e in ENDPOINTS if any(e == end for _, end in rows)]
    return scenarios, endpoints, rows


def title(row: dict) -> str:
    mark = {True: "✓", False: "✗"}.get(row["as_expected"], "?")
    expected = f"~{row['expected_s']:.2f} s" if row.get("expected_s") is not None else "?"
    return (f"{row['scenario']}: {ENDPOINTS.get(row['endpoint'], row['endpoint'])}\n"
            f"{row['total_s']:.2f} s, expected {expected} {mark}")


def draw(document: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    scenarios, endpoints, rows = panels(document)
    if not rows:
        raise ValueError("no burst rows with finish times (run_all.sh --json, this kit's "
                         "load.py)")
    fig, axes = plt.subplots(len(scenarios), len(endpoints), sharex=True, sharey=True,
                             squeeze=False,
                             figsize=(4.2 * len(endpoints), 1.55 * len(scenarios) + 0.9))
    for i, scenario in enumerate(scenarios):
        for j, endpoint in enumerate(endpoints):
            ax = axes[i][j]
            row = rows.get((scenario, endpoint))
            if row is None:
                ax.set_axis_off()
                continue
            finishes = row["finishes_s"]
            ax.step([0.0, *finishes], range(len(finishes) + 1), where="post",
                    color="tab:green" if row["as_expected"] else "tab:red", linewidth=1.6)
            if row.get("expected_s") is not None:
                worst = row.get("expected_worst_s") or row["expected_s"]
                if worst > row["expected_s"]:
                    ax.axvspan(row["expected_s"], worst, color="0.85", zorder=0)
                ax.axvline(row["expected_s"], color="0.3", linestyle="--", linewidth=1)
            ax.set_title(title(row), fontsize=8.5, loc="left")
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds after the start signal", fontsize=8.5)
    for row_axes in axes:
        row_axes[0].set_ylabel("answered", fontsize=8.5)
    settings = document.get("settings", {})
    about = document.get("machine", {})
    fig.suptitle(f"{settings.get('requests')} requests at once, {settings.get('seconds'):g} s "
                 f"each; dashed: expected total. {about.get('cpu', '')}, {about.get('cores')} "
                 f"cores, {about.get('postgresql') or 'PostgreSQL'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_knee(document: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rtts = sorted({row["rtt_ms"] for row in document["rows"]})
    fig, axes = plt.subplots(1, len(rtts), sharey=True, squeeze=False,
                             figsize=(5.2 * len(rtts), 4.2))
    for ax, rtt in zip(axes[0], rtts):
        for i, row in enumerate(r for r in document["rows"] if r["rtt_ms"] == rtt):
            points = sorted(row["points"], key=lambda p: p["rate"])
            colour = f"C{i}"
            ax.plot([p["rate"] for p in points], [p["fast_p99_ms"] for p in points],
                    marker="o", markersize=3.5, color=colour,
                    label=f"{row['setup']} (knee {row['knee']:.0f}/s)")
            ax.axvline(row["knee"], color=colour, linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (10, 20, 50, 100, 200, 500, 1000)
                       if min(p["rate"] for r in document["rows"] for p in r["points"]) / 1.5
                       <= t <= max(p["rate"] for r in document["rows"] for p in r["points"])])
        ax.set_title(f"RTT {rtt:g} ms", fontsize=9.5)
        ax.set_xlabel("offered requests/s (95 % /todos/, 5 % a 200 ms query)", fontsize=8.5)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7.5)
    axes[0][0].set_ylabel("p99 of /todos/, ms (from the scheduled send)", fontsize=8.5)
    fig.suptitle(f"One worker per setup, load.py --rate for {document['duration_s']:g} s per "
                 f"point; dotted: the measured knee. {document.get('machine', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="run_all.sh --json FILE")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        document = json.loads(args.results.read_text())
        if document.get("rows") and "points" in document["rows"][0]:
            draw_knee(document, args.output)
        else:
            draw(document, args.output)
    except (OSError, ValueError, KeyError) as exc:
        print(f"kit.plot: {args.results}: {exc}", file=sys.stderr)
        return 1
    print(f"kit.plot: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
