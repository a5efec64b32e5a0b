"""The paper stage: LaTeX tables and number macros written from the committed result files only. The tables hold
the means and standard deviations of the CSVs (each checked against numbers this test computes itself, to the
rounding of the printed digits), a rerun reproduces the committed paper/tables byte for byte, a missing result
file skips its table with a note, and a missing results folder is one error line (exit 2). No TeX needed. Saving
every figure as PDF and PNG takes seconds, so the full run draws them without saving, and one run saves one."""
import re
import shutil

import pandas as pd
import pytest

import HoloMambaRec as H
from conftest import ROOT

RESULTS = ROOT / "results" / "paper"
HALF_DIGIT = 0.5e-4 + 1e-9  # the tables print 4 decimals: a printed number is within half a unit of the last digit
CELL = re.compile(r"(?:\\textbf\{)?(-?\d+\.\d+)\}?(?:\\std\{(\d+\.\d+)\})?")
METRICS = ["hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The stage run once on the committed results, into a temporary paper_dir; its figures are drawn, not saved."""
    out = tmp_path_factory.mktemp("paper")
    argv = ["--stage=paper", f"--results_dir={RESULTS}", f"--grid_csv={ROOT / 'grid_search_results.csv'}",
            f"--paper_dir={out / 'paper'}", f"--figures_dir={out / 'figures'}"]
    drawn = []

    def draw_only(fig, stem):
        drawn.append(stem.name)
        return [stem.with_suffix(".pdf"), stem.with_suffix(".png")]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(H, "save_paper_figure", draw_only)
        assert H.main(argv) == 0
    out.joinpath("drawn.txt").write_text("\n".join(drawn))
    return out


def rows_of(path):
    """{row key: [cells]} of a generated table: every data row ends with '\\\\ % key'."""
    rows = {}
    for line in path.read_text().splitlines():
        body, sep, key = line.partition(r" \\ % ")
        if sep:
            rows[key] = [cell.strip() for cell in body.split(" & ")]
    return rows


def mean_std(cell):
    match = CELL.fullmatch(cell)
    assert match, cell
    return float(match.group(1)), float(match.group(2)) if match.group(2) else None


def numbers_of(path):
    return dict(re.findall(r"^\\hmdef\{(.+)\}\{(.*)\}$", path.read_text(), flags=re.M))


@pytest.fixture(scope="module")
def accuracy():
    return pd.read_csv(RESULTS / "accuracy.csv", dtype={"config": str})


def seed_stats(accuracy, dataset, model, config, split):
    part = accuracy[(accuracy["dataset"] == dataset) & (accuracy["model"] == model) & (accuracy["config"] == config)
                    & (accuracy["split"] == split)]
    assert part["seed"].nunique() == len(part) > 0
    return part[METRICS].mean(), part[METRICS].std()


def test_main_results_are_the_csv_means_of_the_config_chosen_on_validation(paper, accuracy):
    rows = rows_of(paper / "paper" / "tables" / "main_results.tex")
    ours = {k: v for k, v in rows.items() if "/published/" not in k}
    expected = accuracy[accuracy["model"] != "HoloMamba-Shuffled"][["dataset", "model"]].drop_duplicates()
    assert len(ours) == len(expected) == 10
    for key, cells in ours.items():
        dataset, run, split = key.split("/")
        model, config = run.split("@")
        valid = accuracy[(accuracy["dataset"] == dataset) & (accuracy["model"] == model) & (accuracy["split"] == "valid")]
        assert config == valid.groupby("config")["ndcg@10"].mean().idxmax()  # chosen on validation, never on test
        mean, std = seed_stats(accuracy, dataset, model, config, split)
        for metric, cell in zip(METRICS, cells[1:]):
            printed_mean, printed_std = mean_std(cell)
            assert abs(printed_mean - mean[metric]) <= HALF_DIGIT, (key, metric)
            assert abs(printed_std - std[metric]) <= HALF_DIGIT, (key, metric)
    published = [k for k in rows if "/published/" in k]
    assert len(published) == len(H.PUBLISHED)


def test_ablation_rows_and_differences_follow_the_csv(paper, accuracy):
    rows = rows_of(paper / "paper" / "tables" / "ablation.tex")
    assert {k.split("/")[1].split("@")[0] for k in rows} == {"Mamba-ItemOnly", "HoloMamba", "HoloMamba-Shuffled"}
    for key, cells in rows.items():
        dataset, run = key.split("/")
        model, config = run.split("@")
        valid, _ = seed_stats(accuracy, dataset, model, config, "valid")
        test, _ = seed_stats(accuracy, dataset, model, config, "test")
        printed = [mean_std(c)[0] for c in cells[2:5]]
        for value, reference in zip(printed, (valid["ndcg@10"], test["hr@10"], test["ndcg@10"])):
            assert abs(value - reference) <= HALF_DIGIT, key
        if model != "Mamba-ItemOnly":
            item_only = accuracy[(accuracy["dataset"] == dataset) & (accuracy["model"] == "Mamba-ItemOnly")]
            reference = H.PAPER_ITEM_ONLY.get(config, item_only["config"].iloc[0])  # same recipe without attributes
            base, _ = seed_stats(accuracy, dataset, "Mamba-ItemOnly", reference, "test")
            delta = float(re.sub(r"[$\\%]", "", cells[5]))
            assert abs(delta - 100 * (test["ndcg@10"] / base["ndcg@10"] - 1)) <= 0.05 + 1e-9, key


def test_every_accuracy_number_of_the_text_is_a_csv_mean(paper, accuracy):
    numbers = numbers_of(paper / "paper" / "tables" / "numbers.tex")
    groups = accuracy.groupby(["dataset", "model", "config", "split"])[METRICS]
    stats = {"": groups.mean(), "/std": groups.std()}
    checked = 0
    for key, value in numbers.items():
        match = re.fullmatch(r"acc/([^/]+)/([^/@]+)@([^/]+)/(valid|test)/(" + "|".join(METRICS) + ")(/std)?", key)
        if match:
            dataset, model, config, split, metric, std = match.groups()
            assert abs(float(value) - stats[std or ""].loc[(dataset, model, config, split), metric]) <= HALF_DIGIT, key
            checked += 1
    runs = len(accuracy.groupby(["dataset", "model", "config"]))
    assert runs >= 14 and checked == runs * 2 * len(METRICS) * 2  # every (dataset, model, config), 2 splits, mean and std


def test_compression_and_memory_numbers_follow_their_csvs(paper):
    numbers = numbers_of(paper / "paper" / "tables" / "numbers.tex")
    for _, row in pd.read_csv(RESULTS / "compression.csv").iterrows():
        key = f"comp/{row['dataset']}/k{row['k']}/{row['bundling']}"
        assert abs(float(numbers[f"{key}/ndcg@10"]) - row["ndcg@10"]) <= HALF_DIGIT
        assert abs(float(numbers[f"{key}/latency_ms"]) - row["latency_ms"]) <= 0.05 + 1e-9
    memory = pd.read_csv(RESULTS / "memory.csv")
    memory["label"] = [H.memory_label(*r) for r in memory[["variant", "memory_len", "items_read"]].to_numpy()]
    checked = 0
    for (dataset, label, part), rows in memory.groupby(["dataset", "label", "slice"]):
        key = f"mem/{dataset}/{H.slug(label)}/{H.slug(part)}"
        if rows["users"].iloc[0] < H.MEMORY_MIN_USERS:
            assert f"{key}/ndcg@10" not in numbers
            continue
        for metric in ("ndcg@10", "hr@10"):
            assert abs(float(numbers[f"{key}/{metric}"]) - rows[metric].mean()) <= HALF_DIGIT, key
            if len(rows) > 1:
                assert abs(float(numbers[f"{key}/{metric}/std"]) - rows[metric].std()) <= HALF_DIGIT, key
            checked += 1
    beauty_labels = memory.loc[memory["dataset"] == "amazon-beauty", "label"].nunique()
    # every group is checked but Beauty's long slice (1 user), one per Beauty variant
    assert checked == 2 * (len(memory.groupby(["dataset", "label", "slice"])) - beauty_labels)
    window = memory[(memory["dataset"] == "ml-1m") & (memory["slice"] == "all users")].groupby("label")["ndcg@10"].mean()
    for extension, name in (("window + memory 500", "memory-minus-window-500"),
                            ("window + memory 500, from base (frozen)", "memory-minus-window-500-warm-frozen")):
        gap = float(numbers[f"mem/ml-1m/{name}/all-users/ndcg@10"])
        assert abs(gap - (window[extension] - window["window"])) <= HALF_DIGIT
    gap = float(numbers["mem/ml-1m/ramrec-minus-sasrec-warm-all/all-users/ndcg@10"])
    assert abs(gap - (window["RAMRec, from base (all)"] - window["SASRec"])) <= HALF_DIGIT


def test_a_rerun_on_the_committed_results_reproduces_the_committed_tables(paper):
    committed, fresh = ROOT / "paper" / "tables", paper / "paper" / "tables"
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in committed.iterdir():
        assert (fresh / path.name).read_bytes() == path.read_bytes(), path.name
    committed_figures = {p.stem for p in (ROOT / "paper" / "figures").iterdir()}
    assert set((paper / "drawn.txt").read_text().split()) == committed_figures
    assert not (paper / "figures").exists()  # the paper stage never redraws the result figures


def test_a_missing_result_file_skips_its_table_with_a_note(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS / "memory.csv", results)
    argv = ["--stage=paper", f"--results_dir={results}", f"--grid_csv={tmp_path / 'none.csv'}",
            f"--paper_dir={tmp_path / 'paper'}"]
    assert H.main(argv) == 0
    out = capsys.readouterr().out
    assert "paper: skipped tables/main_results.tex" in out and "accuracy.csv is missing" in out
    tables = {p.name for p in (tmp_path / "paper" / "tables").iterdir()}
    assert tables == {"memory.tex", "presets.tex", "numbers.tex"}
    assert {p.name for p in (tmp_path / "paper" / "figures").iterdir()} == {"architecture.pdf", "architecture.png"}
    assert (tmp_path / "paper" / "figures" / "architecture.pdf").read_bytes().startswith(b"%PDF")
    assert "mem/ml-1m/window/all-users/ndcg@10" in numbers_of(tmp_path / "paper" / "tables" / "numbers.tex")


def test_a_missing_results_folder_is_one_error_line(tmp_path, capsys):
    argv = ["--stage=paper", f"--results_dir={tmp_path / 'nowhere'}", f"--paper_dir={tmp_path / 'paper'}"]
    assert H.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: --results_dir=") and "no such folder" in lines[-1]
    assert not (tmp_path / "paper").exists() and not (tmp_path / "nowhere").exists()
