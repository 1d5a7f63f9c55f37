"""The HelpSteer-like score generator and the reader's CSV loader (prefdyn.datasets.scores) against
direct counts: the marginal score frequencies it is built to have, the correlation it is given, and
files written by hand, good and malformed (each error names the file and the line)."""
import csv

import numpy as np
import pytest

from prefdyn.datasets import scores as sc


def test_generated_table_has_the_shape_range_and_marginals_it_is_built_with():
    table = sc.generate_scores(20000, K=4, seed=1)
    assert table.scores.shape == (20000, 4, 5) and table.attributes == sc.ATTRIBUTES
    assert table.scores.min() >= 0 and table.scores.max() <= 4 and table.scores.dtype == np.int64
    flat = table.scores.reshape(-1, 5)
    freq = np.stack([np.bincount(flat[:, a], minlength=5) / len(flat) for a in range(5)])
    assert np.abs(freq - sc.DEFAULT_LEVEL_PROBABILITIES).max() < 0.01     # 80,000 draws an attribute
    assert len(set(table.prompts)) == 20000


def test_generated_attributes_are_correlated_in_the_order_of_the_latent_correlation():
    R = sc.DEFAULT_CORRELATION
    flat = sc.generate_scores(20000, seed=2).scores.reshape(-1, 5).astype(float)
    C = np.corrcoef(flat.T)
    # discretised scores are less correlated than their latents, but in the same order
    assert C[0, 1] > C[0, 2] > C[0, 3] > C[2, 4] - 0.05
    assert np.all(np.abs(C - R)[np.triu_indices(5, 1)] < 0.2)
    independent = sc.generate_scores(20000, correlation=np.eye(5), prompt_share=0.0, seed=2)
    C0 = np.corrcoef(independent.scores.reshape(-1, 5).astype(float).T)
    assert np.abs(C0[np.triu_indices(5, 1)]).max() < 0.03


def test_prompt_share_makes_the_responses_to_one_prompt_alike():
    def within_prompt_correlation(share):
        s = sc.generate_scores(20000, K=2, prompt_share=share, seed=3).scores[:, :, 0].astype(float)
        return np.corrcoef(s[:, 0], s[:, 1])[0, 1]

    assert abs(within_prompt_correlation(0.0)) < 0.03
    assert within_prompt_correlation(0.6) > within_prompt_correlation(0.3) + 0.15


def test_generator_is_seeded_and_checks_its_parameters():
    assert np.array_equal(sc.generate_scores(50, seed=4).scores, sc.generate_scores(50, seed=4).scores)
    assert not np.array_equal(sc.generate_scores(50, seed=4).scores, sc.generate_scores(50, seed=5).scores)
    bad_R = sc.DEFAULT_CORRELATION.copy()
    bad_R[0, 1] = bad_R[1, 0] = 0.99
    bad_R[0, 2] = bad_R[2, 0] = -0.99
    with pytest.raises(ValueError, match="correlation"):
        sc.generate_scores(10, correlation=bad_R)
    with pytest.raises(ValueError, match="level_probabilities"):
        sc.generate_scores(10, level_probabilities=np.full((5, 5), 0.3))
    with pytest.raises(ValueError, match="prompt_share"):
        sc.generate_scores(10, prompt_share=1.0)


def write_csv(path, rows, header=("prompt", "response") + sc.ATTRIBUTES):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_load_scores_groups_by_prompt_keeps_the_first_k_and_counts_the_dropped(tmp_path):
    rows = [("p1", f"r{i}", i % 5, 4, 3, 2, 1) for i in range(5)] + \
           [("p2, with a comma", f"s{i}", 0, 1, 2, 3, 4) for i in range(4)] + [("p3", "t", 1, 1, 1, 1, 1)]
    table = sc.load_scores(write_csv(tmp_path / "h.csv", rows), K=4)
    assert table.prompts == ("p1", "p2, with a comma") and table.dropped == 1
    assert table.scores.shape == (2, 4, 5)
    assert table.scores[0, :, 0].tolist() == [0, 1, 2, 3]           # the first four of p1, in file order
    assert table.scores[1, 2].tolist() == [0, 1, 2, 3, 4]
    assert "2 prompts" in table.source and "h.csv" in sc.provenance(tmp_path / "h.csv", table)
    assert "1 prompts with fewer responses" in sc.provenance(tmp_path / "h.csv", table)


def test_load_scores_reads_the_columns_by_name_in_any_order(tmp_path):
    header = ("verbosity", "id", "response", "coherence", "prompt", "helpfulness", "complexity", "correctness")
    rows = [(4, k, f"r{k}", 2, "p", 0, 3, 1) for k in range(4)]
    table = sc.load_scores(write_csv(tmp_path / "o.csv", rows, header), K=4)
    assert table.scores[0, 0].tolist() == [0, 1, 2, 3, 4]            # in the order of ATTRIBUTES


@pytest.mark.parametrize("rows,header,message", [
    ([], ("prompt", "response", "helpfulness"), "line 1: the header lacks correctness"),
    ([("p", "r", 1, 2, 3, 4, 5)], None, "line 2: verbosity = '5' is not an integer score from 0 to 4"),
    ([("p", "r", 1, 2, 3, 4, 0), ("p", "r", "x", 2, 3, 4, 0)], None, "line 3: helpfulness = 'x'"),
    ([("p", "r", 1, 2, 3)], None, "line 2: 5 fields where the header has 7"),
    ([("p", "r", 1, 2, 3, 4, 0)], None, "no prompt has 4 responses"),
])
def test_malformed_files_fail_naming_the_file_the_line_and_the_fix(tmp_path, rows, header, message):
    path = write_csv(tmp_path / "bad.csv", rows, header or ("prompt", "response") + sc.ATTRIBUTES)
    with pytest.raises(ValueError, match="bad.csv") as err:
        sc.load_scores(path, K=4)
    assert message in str(err.value)


def test_unreadable_and_empty_files_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="cannot be read.*or None for the generated table"):
        sc.load_scores(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        sc.load_scores(tmp_path / "empty.csv")


def test_provenance_of_the_generated_table_says_it_is_not_helpsteer():
    table = sc.generate_scores(12, seed=0)
    text = sc.provenance(None, table)
    assert "12 generated HelpSteer-like prompts" in text and "not NVIDIA HelpSteer" in text
