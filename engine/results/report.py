"""`collapse report DIR`: one self-contained HTML page of a study's results.

Everything on the page is computed from what the run left in DIR: the tidy table (the
headline view, a pivot per metric), the plots `collapse plot` draws (embedded as PNG
data, so the page travels as one file), a few samples of every generation's corpus as
text (families whose samples read as text: the LM's stories), the resolved study, and
the run's facts (runs.json: versions, hardware, time; each generation's seconds per
phase from the chains' records). No script, no external file: it opens anywhere.
"""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import pandas as pd

from engine import results, strategies
from engine.corpus import CorpusStore
from engine.records import DamagedFile, intact_record, read_runs
from engine.families import family_for, get_family
from engine.files import Location, write_atomic
from engine.layout import ChainLayout, RunLayout
from engine.spec import Trial

SAMPLES_PER_CORPUS = 3  # stories shown per generation and chain
SAMPLE_CHARS = 600  # a story longer than this is cut, and says so
SAMPLE_CHAINS = 8  # chains whose samples are shown (the first seed's, in order)

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em;
  border-bottom: 1px solid #ccc; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.caption { color: #555; font-style: italic; margin: .2em 0; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 12px; }
.story { white-space: pre-wrap; background: #fafafa; border-left: 3px solid #9ab;
         padding: .3em .6em; margin: .3em 0; font-size: 13px; }
nav a { margin-right: 1em; }
"""


def write_report(directory: Location | Path | str,
                 out: Location | Path | str | None = None) -> Location:
    """Write the report of the study run in `directory` (default: DIR/report.html)."""
    run = RunLayout.of(directory)
    table = results.load_results(run.out)  # a clear error if the study has not run
    family = get_family(table["family"].iloc[0])
    study_name = str(table["study"].iloc[0])
    sections = [
        ("Results", _headline(table)),
        ("Plots", _plots(table, run)),
        ("Every metric", _pivots(table, family)),
        ("Samples", _samples(run)),
        ("Run", _facts(run)),
        ("Study", _study(run)),
    ]
    nav = " ".join(f'<a href="#{_anchor(title)}">{title}</a>' for title, _ in sections)
    body = "\n".join(f'<h2 id="{_anchor(title)}">{title}</h2>\n{content}'
                     for title, content in sections)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(study_name)}: collapse report</title><style>{_STYLE}</style></head>"
            f"<body>\n<h1>{_e(study_name)}</h1>\n<p class=\"caption\">{_e(_subtitle(table))}"
            f"</p>\n<nav>{nav}</nav>\n{body}\n</body></html>\n")
    target = Location.of(out) if out else run.report
    write_atomic(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return target


def _e(text: object) -> str:
    return html.escape(str(text))


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _subtitle(table: pd.DataFrame) -> str:
    scalar = table[table["step"].isna()]
    return (f"family {table['family'].iloc[0]}; strategies "
            f"{', '.join(dict.fromkeys(table['strategy']))}; "
            f"{int(scalar['generation'].max())} generations; {results.seed_count(table)} "
            f"seed(s); {table['trial'].nunique()} chains")


def _html_table(frame: pd.DataFrame) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.4g}", na_rep="n/a", border=0)


def _headline(table: pd.DataFrame) -> str:
    """What `collapse table` prints: the family's paper layout (the seed paper's
    Table 2 for the LM) or the headline metric's pivot, with its caption."""
    caption, view = results.table_view(table)
    metric = results.headline_metric(table)
    text = f"<p class=\"caption\">{_e(metric)}, on real held-out data"
    text += f"; {_e(caption)}</p>" if caption else "</p>"
    text += _html_table(view)
    caption, view = results.collapse_profile(table)
    return text + f"<h3>Collapse profile</h3><p class=\"caption\">{_e(caption)}</p>" + \
        _html_table(view)


def _pivots(table: pd.DataFrame, family) -> str:
    """A pivot per scalar metric (strategy × grid axes by generation), with intervals
    over seeds where there are several."""
    scalar = table[table["step"].isna()]
    present = list(dict.fromkeys(scalar["metric"]))
    ordered = [m for m in family.metrics if m in present] + \
        [m for m in present if m not in family.metrics]
    seeds = results.seed_count(table)
    parts = []
    for metric in ordered:
        view = (results.pivot_with_intervals(table, metric) if seeds > 1
                else results.pivot(table, metric))
        parts.append(f"<h3>{_e(metric)}</h3>" + _html_table(view))
    if seeds > 1:
        parts.insert(0, f"<p class=\"caption\">cells: mean ± half-width of the 95% "
                        f"Student-t interval over {seeds} seeds</p>")
    return "\n".join(parts)


def _plots(table: pd.DataFrame, run: RunLayout) -> str:
    """The PNGs `collapse plot` draws, drawn afresh into a scratch folder and embedded."""
    with tempfile.TemporaryDirectory(prefix="collapse-report-") as tmp:
        paths = results.plot(table, tmp) + results.plot_samples(run.out, tmp) + \
            results.plot_histograms(run.out, tmp)
        images = [(p.name, base64.b64encode(p.read_bytes()).decode("ascii")) for p in paths]
    return "\n".join(f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}">'
                     f"<figcaption class=\"caption\">{_e(name)}</figcaption></figure>"
                     for name, data in images)


def _trials(run: RunLayout) -> list[tuple[ChainLayout, Trial]]:
    out = []
    for chain in run.chains():
        record = intact_record(chain.trial_file)  # a damaged one: the chain is left out
        if record is not None:
            out.append((chain, Trial.from_dict(record)))
    return out


def _samples(run: RunLayout) -> str:
    """The first stories of each generation's corpus, next to the real data's, for the
    first seed's chains: what the models wrote, generation by generation."""
    trials = _trials(run)
    if not trials:
        return "<p>No chains in this directory.</p>"
    first_seed = min(t.seed for _, t in trials)
    shown = [(c, t) for c, t in trials if t.seed == first_seed][:SAMPLE_CHAINS]
    parts = []
    for chain, trial in shown:
        family = family_for(trial)
        store = CorpusStore(chain.corpus)
        rows = []
        corpora = [(strategies.real(1), "real data", chain.model(1))] + [
            (strategies.synthetic(g), f"generation {g}", chain.model(g))
            for g in range(1, trial.generations + 1)]
        for source, label, model_dir in corpora:
            if not store.has(source):
                continue
            as_text = family.presentation.sample_text
            if as_text is None:  # this family's samples are not text
                return ("<p>This family's samples are not text; the sample grids, where it "
                        "draws them, are among the plots.</p>")
            texts = as_text(store.head(source, SAMPLES_PER_CORPUS), model_dir)
            stories = "".join(
                f'<div class="story">{_e(t[:SAMPLE_CHARS])}'
                f'{"…" if len(t) > SAMPLE_CHARS else ""}</div>' for t in texts)
            rows.append(f"<h4>{_e(label)}</h4>{stories}")
        parts.append(f"<h3>{_e(chain.root.name)}</h3>" + "".join(rows))
    more = len([1 for _, t in trials if t.seed == first_seed]) - len(shown)
    if more > 0:
        parts.append(f"<p class=\"caption\">{more} more chains of seed {first_seed} not "
                     "shown.</p>")
    return "\n".join(parts)


def _facts(run: RunLayout) -> str:
    """Each `collapse run` of this directory (versions, hardware, when, how long), and
    the seconds each phase took per generation, summed over chains."""
    parts = []
    try:
        runs = read_runs(run.run_facts)
    except DamagedFile as e:
        runs = []
        parts.append(f"<p>{_e(str(e))}</p>")
    for i, facts in enumerate(runs, start=1):
        finished = (f"finished {facts['finished']} after {facts['seconds']:.0f} s"
                    if "finished" in facts else "did not finish (interrupted or failed)")
        versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items() if v)
        nodes = pd.DataFrame(facts["nodes"]).fillna("none")  # a node without GPUs
        parts.append(f"<h3>run {i}: started {_e(facts['started'])}, {_e(finished)}</h3>"
                     f"<p><code>{_e(facts.get('command', ''))}</code></p>"
                     f"<p>driver {_e(facts['driver'])} ({_e(facts['platform'])})<br>"
                     f"{_e(versions)}</p>" + _html_table(nodes.set_index("host")))
    if not runs:
        parts.append("<p>No run facts (runs.json): this directory was run before the engine "
                     "recorded them.</p>")
    phases = _phase_seconds(run)
    if not phases.empty:
        parts.append("<h3>seconds per phase, summed over chains</h3>"
                     "<p class=\"caption\">each chain's wall seconds, added up: chains run "
                     "side by side, so the sums exceed the study's time; fit includes reading "
                     "the training mix, and a chain waiting for a generation-1 model or "
                     "corpus another chain makes counts its wait</p>"
                     + _html_table(phases))
    return "\n".join(parts)


def _phase_seconds(run: RunLayout) -> pd.DataFrame:
    rows = []
    for chain, trial in _trials(run):
        for g in range(1, trial.generations + 1):
            record = intact_record(chain.metrics(g))
            if record is None:
                break
            for phase, seconds in record.get("seconds", {}).items():
                rows.append({"generation": g, "phase": phase, "seconds": seconds})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).pivot_table(index="generation", columns="phase",
                                           values="seconds", aggfunc="sum")
    frame.loc["all"] = frame.sum()
    return frame


def _study(run: RunLayout) -> str:
    if not run.study_file.exists():
        return "<p>No study.yaml in this directory.</p>"
    return f"<p class=\"caption\">{_e(run.study_file)}, as resolved</p>" \
           f"<pre>{_e(run.study_file.read_text())}</pre>"
