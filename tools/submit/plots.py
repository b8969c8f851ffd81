"""Training curves of the runs as one PNG (matplotlib, Agg)."""

import math


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_runs(runs, out_path, plt):
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for r in runs:
        label = "%s%s" % (r.run_id, "" if r.complete else " (%s)" % r.status)
        tp = [(s, l, ms) for s, l, ms in r.train_points if l is not None and math.isfinite(l)]
        vp = [(s, b, ms) for s, _, b, ms in r.val_points if b is not None and math.isfinite(b)]
        line = None
        if tp:
            line, = axes[0][0].plot([p[0] for p in tp], [p[1] for p in tp], label=label)
            w = [p for p in tp if p[2] is not None]
            axes[0][1].plot([p[2] / 1000 for p in w], [p[1] for p in w],
                            color=line.get_color(), label=label)
        color = line.get_color() if line is not None else None
        if vp:
            l2, = axes[1][0].plot([p[0] for p in vp], [p[1] for p in vp], marker="o",
                                  ms=3, color=color, label=label)
            color = l2.get_color()
            w = [p for p in vp if p[2] is not None]
            axes[1][1].plot([p[2] / 1000 for p in w], [p[1] for p in w], marker="o", ms=3,
                            color=color, label=label)
        if r.complete and r.steps is not None:
            axes[1][0].plot([r.steps], [r.val_bpb], marker="*", ms=12, color=color,
                            linestyle="none")
            if r.train_time_ms is not None:
                axes[1][1].plot([r.train_time_ms / 1000], [r.val_bpb], marker="*", ms=12,
                                color=color, linestyle="none")
    titles = (("train loss vs step", "step", "train_loss"),
              ("train loss vs wall-clock", "train time (s)", "train_loss"),
              ("val_bpb vs step (star: final score)", "step", "val_bpb"),
              ("val_bpb vs wall-clock (star: final score)", "train time (s)", "val_bpb"))
    for ax, (title, xl, yl) in zip([a for row in axes for a in row], titles):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100, format="png")
    plt.close(fig)
