"""Drawing only: every figure is made from the CSV tables the experiments wrote.

    draw(name, tables) -> matplotlib Figure, for name in FIGURES (f1..f6)

Each function takes {table name: DataFrame} as read back from the CSV files, so a figure
can be redrawn (`python -m sims plot`) without simulating anything.
"""
import matplotlib

matplotlib.use("Agg")       # files only; never needs a display

import matplotlib.pyplot as plt   # noqa: E402
import numpy as np                # noqa: E402
import seaborn as sns             # noqa: E402

LABELS = {"first": "first layer (surgical)", "last": "last layer", "all": "full fine-tuning",
          "lp-ft": "LP-FT"}
SHORT_LABELS = {"first": "first layer\n(surgical)", "last": "last layer", "all": "full",
                "lp-ft": "LP-FT"}
# Okabe-Ito colours (colour-blind safe); LP-FT is also dashed, since it follows "last" and
# then "all".
COLORS = {"first": "#0072B2", "last": "#E69F00", "all": "#009E73", "lp-ft": "#CC79A7"}
DASHES = {"first": "-", "last": "-", "all": "-", "lp-ft": "--"}
ACTIVATION_TITLES = {"linear": "linear network", "relu": "ReLU network"}
# Figure -> the CSV tables it is drawn from (file names without .csv).
FIGURES = {"f1_t1_curves": ["f1_t1_curves"], "f2_loss_vs_n": ["f2_loss_vs_n"],
           "f3_best_layer": ["f3_best_layer"], "f4_t1_event": ["f4_t1_event"],
           "f5_forgetting": ["f5_forgetting"], "f6_auto_rgn": ["f6_auto_rgn"]}


def style():
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "axes.titleweight": "bold",
                         "legend.framealpha": 0.9})


def draw(name, tables):
    """The figure `name` (a key of FIGURES) from its tables {csv name: DataFrame}."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; expected one of {sorted(FIGURES)}")
    style()
    return globals()["_" + name.split("_", 1)[0]](*(tables[t] for t in FIGURES[name]))


def _band(ax, x, center, low, high, method, **kwargs):
    ax.plot(x, center, color=COLORS[method], label=LABELS[method], lw=2, ls=DASHES[method],
            **kwargs)
    ax.fill_between(x, low, high, color=COLORS[method], alpha=0.2, lw=0)


def _f1(table):
    """Target loss over training, geometric mean over draws with +- 1 s.e. of log10."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (activation, part) in zip(axes, table.groupby("activation", sort=False)):
        for method, curve in part.groupby("method", sort=False):
            curve = curve[curve.step > 0]
            center = curve.log10_mean.to_numpy()
            _band(ax, curve.step, 10**center, 10**(center - curve.log10_se),
                  10**(center + curve.log10_se), method)
        ax.set(xscale="log", yscale="log", xlabel="gradient steps",
               title=f"{ACTIVATION_TITLES[activation]} ({int(part.draws.max())} draws)")
    axes[0].set_ylabel("target loss / E[y²]\n(geometric mean over draws, ± s.e.)")
    axes[0].legend(loc="lower left")
    switch = int(table[table.method == "lp-ft"].step.max()) // 2
    for ax in axes:
        ax.axvline(switch, color=COLORS["lp-ft"], lw=0.8, ls=":")
        ax.text(switch, 0.98, " LP-FT: probing → full", transform=ax.get_xaxis_transform(),
                fontsize=8, color=COLORS["lp-ft"], va="top", ha="right")
    fig.suptitle("F1 · claim T1: n = 6 target samples that span the new directions "
                 "(d = 10, k = 4)", fontweight="bold")
    fig.tight_layout()
    return fig


def _f2(table):
    """Final target loss against n, one panel per activation and shift kind."""
    kinds = list(dict.fromkeys(table.kind))
    activations = list(dict.fromkeys(table.activation))
    fig, axes = plt.subplots(len(activations), len(kinds), figsize=(4 * len(kinds), 7.4),
                             sharex=True, squeeze=False)
    for row, activation in enumerate(activations):
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            part = table[(table.activation == activation) & (table.kind == kind)]
            for method, curve in part.groupby("method", sort=False):
                low = np.maximum(curve["mean"] - curve.se, curve["mean"] * 1e-3)
                ax.errorbar(curve.n, curve["mean"], yerr=[curve["mean"] - low, curve.se],
                            color=COLORS[method], label=LABELS[method], marker="o", ms=4,
                            lw=1.8, capsize=2, ls=DASHES[method])
            ax.set(xscale="log", yscale="log", title=f"{kind} · {activation}")
            ax.set_xticks(sorted(set(part.n)), [str(n) for n in sorted(set(part.n))])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-33))
            if row == len(activations) - 1:
                ax.set_xlabel("target samples n")
        axes[row, 0].set_ylabel("final target loss / E[y²]")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.955),
               frameon=False)
    draws = "/".join(sorted(set(str(d) for d in table.draws)))
    fig.suptitle(f"F2 · final target loss against n, for each shift ({draws} draws per point, "
                 "mean ± s.e.; d = 10, k = 4 unless k = d)", fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def _f3(table):
    """Heatmap shift kind x tuned layer: mean loss relative to full fine-tuning."""
    methods = ["first", "last", "lp-ft", "all"]
    activations = list(dict.fromkeys(table.activation))
    fig, axes = plt.subplots(1, len(activations), figsize=(6.2 * len(activations), 4.4),
                             squeeze=False)
    for ax, activation in zip(axes[0], activations):
        part = table[table.activation == activation]
        ratio = part.pivot(index="kind", columns="method", values="relative_to_all")
        se = part.pivot(index="kind", columns="method", values="relative_se")
        kinds = list(dict.fromkeys(part.kind))
        ratio, se = ratio.loc[kinds, methods], se.loc[kinds, methods]
        text = np.array([[f"{r:.2g}\n±{s:.1g}" if m != "all" else "1"
                          for r, s, m in zip(rr, ss, methods)]
                         for rr, ss in zip(ratio.to_numpy(), se.to_numpy())])
        sns.heatmap(np.log10(ratio), ax=ax, annot=text, fmt="", cmap="RdBu_r", center=0,
                    vmin=-2, vmax=2, cbar_kws={"label": "log10(loss / full fine-tuning)"},
                    xticklabels=[SHORT_LABELS[m] for m in methods], yticklabels=kinds,
                    annot_kws={"fontsize": 9})
        ax.set(xlabel="tuned layer(s)", ylabel="shift",
               title=f"{ACTIVATION_TITLES[activation]}, n = {int(part.n.iloc[0])}")
        ax.tick_params(axis="x", rotation=0)
        ax.tick_params(axis="y", rotation=0)
    fig.suptitle("F3 · which layer to tune depends on the shift "
                 "(mean target loss relative to full fine-tuning; blue = better)",
                 fontweight="bold")
    fig.tight_layout()
    return fig


def _f4(table):
    """Exact probability of the T1 event against n, and its empirical counterparts."""
    fig, ax = plt.subplots(figsize=(11.5, 4.8))
    ax.plot(table.n, table.exact, color="black", lw=2, label="P(T1 event), exact binomial")
    draws = int(table.draws.iloc[0])
    ax.errorbar(table.n, table.event_frequency,
                yerr=np.sqrt(table.event_frequency * (1 - table.event_frequency) / draws),
                fmt="s", color="gray", ms=5, capsize=2, label="event frequency in the draws")
    ax.errorbar(table.n, table.frequency, yerr=table.se, fmt="o", color=COLORS["first"],
                ms=6, capsize=2, label="simulated: first layer ~0 and full fine-tuning > 0")
    ax.bar(table.n, table.full_unconverged, color=COLORS["all"], alpha=0.35, width=0.6,
           label="full fine-tuning not yet at 0 although\nthe sample spans all d directions")
    ax.set(xlabel="target samples n", ylabel="probability / frequency", ylim=(0, 1.05),
           xticks=list(table.n),
           title=f"F4 · claim T1's event over n (ds = 8, m = 2, p = 0.5; {draws} draws per n)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    return fig


def _f5(table):
    """The forgetting mechanism: drift of the head and errors by direction over time."""
    quantities = list(dict.fromkeys(table.quantity))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, quantity in zip(axes.flat, quantities):
        part = table[(table.quantity == quantity) & (table.step > 0)]
        for method, curve in part.groupby("method", sort=False):
            if quantity.startswith("head drift"):
                _band(ax, curve.step, curve["mean"], curve["mean"] - curve.se,
                      curve["mean"] + curve.se, method)
            else:
                center = curve.log10_mean.to_numpy()
                _band(ax, curve.step, 10**center, 10**(center - curve.log10_se),
                      10**(center + curve.log10_se), method)
        ax.set(xscale="log", xlabel="gradient steps", title=quantity)
        if quantity.startswith("head drift"):
            ax.set(ylabel="mean ± s.e. over draws")
        else:
            ax.set(yscale="log", ylabel="loss / E[y²] on those inputs\n(geometric mean ± s.e.)")
    axes[0, 0].legend(loc="upper left")
    draws = int(table.draws.max())
    fig.suptitle("F5 · how full fine-tuning forgets (linear T1, n = 6, event samples, "
                 f"{draws} draws):\nthe head moves, so the old directions the sample missed "
                 "go wrong; first-layer tuning keeps them exact (~1e-31 = rounding)",
                 fontweight="bold")
    fig.tight_layout()
    return fig


def _f6(table):
    """Auto-RGN's pick against the better single layer, per draw, and agreement rates."""
    clip = 6.0
    with np.errstate(divide="ignore"):  # log10 of a zero ratio (an exact fit): -inf, clipped
        table = table.assign(
            rgn=np.clip(np.log10(table.rgn_first / table.rgn_last), -clip, clip),
            gain=np.clip(np.log10(table.loss_last / table.loss_first), -clip, clip))
    kinds = list(dict.fromkeys(table.kind))
    palette = dict(zip(kinds, sns.color_palette("deep", len(kinds))))
    activations = list(dict.fromkeys(table.activation))
    fig, axes = plt.subplots(1, len(activations) + 1, figsize=(16, 4.8),
                             gridspec_kw={"width_ratios": [1] * len(activations) + [1.1]})
    for ax, activation in zip(axes, activations):
        part = table[table.activation == activation]
        for x0, x1, y0, y1 in ((0, clip, 0, clip), (-clip, 0, -clip, 0)):
            ax.fill_between([x0, x1], y0, y1, color="green", alpha=0.07, lw=0)
        sns.scatterplot(data=part, x="rgn", y="gain", hue="kind", palette=palette, ax=ax,
                        s=16, alpha=0.7, legend=activation == activations[0])
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlim=(-clip - 0.3, clip + 0.3), ylim=(-clip - 0.3, clip + 0.3),
               xlabel="log10(RGN of B / RGN of v) at the pretrained point\n"
                      "(> 0: Auto-RGN favours the first layer)",
               ylabel="log10(loss last / loss first)\n(> 0: first layer is better)",
               title=f"{ACTIVATION_TITLES[activation]} (green: Auto-RGN right)")
    axes[0].legend(loc="lower right", fontsize=8, title="shift")
    rates = (table.groupby(["activation", "kind"], sort=False)["agree"]
             .agg(["mean", "count"]).reset_index())
    rates["se"] = np.sqrt(rates["mean"] * (1 - rates["mean"]) / rates["count"])
    ax = axes[-1]
    width = 0.8 / len(activations)
    for i, activation in enumerate(activations):
        part = rates[rates.activation == activation].set_index("kind").loc[kinds]
        ax.bar(np.arange(len(kinds)) + (i - (len(activations) - 1) / 2) * width,
               part["mean"], width, yerr=part.se, capsize=2, label=activation,
               color=sns.color_palette("muted")[i])
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_xticks(np.arange(len(kinds)), kinds, rotation=15)
    ax.set(ylim=(0, 1.05), ylabel="fraction of draws where Auto-RGN\npicks the better layer",
           title="agreement (± s.e.)")
    ax.legend(fontsize=8)
    fig.suptitle(f"F6 · Auto-RGN on the two-layer toy (n = {int(table.n.iloc[0])}; "
                 "axes clipped at ±6)", fontweight="bold")
    fig.tight_layout()
    return fig
