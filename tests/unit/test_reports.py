"""The rule parser on 800 real CT-RATE reports, and the reports table's per-row checks."""

import gzip
import json
import re

import pytest

from ctray.anatomy import DEFAULT_ANATOMIES
from ctray.ingest.reports import RuleParser, parse_label_table, parse_report_table, split_sentences

# CT-RATE label -> (anatomy, a word the routed sentences must contain)
ROUTING = {
    "Emphysema": ("lung", r"emphysem"),
    "Pleural effusion": ("lung", r"effusion"),
    "Lung nodule": ("lung", r"nodul"),
    "Consolidation": ("lung", r"consolidat"),
    "Bronchiectasis": ("lung", r"bronchiecta"),
    "Cardiomegaly": ("heart", r"cardiomegal|heart"),
    "Pericardial effusion": ("heart", r"pericard"),
    "Coronary artery wall calcification": ("heart", r"coronary"),
    "Hiatal hernia": ("esophagus", r"hernia"),
    "Arterial wall calcification": ("aorta", r"aort|arter|atherom"),
}


@pytest.fixture(scope="module")
def ct_rate(shared_data):
    path = shared_data / "reports" / "ct_rate_reports_train.csv"
    return parse_report_table(path.read_bytes(), path.name, "AccessionNo", ["report_text"])


def test_every_real_report_yields_anatomy_texts(ct_rate):
    parser = RuleParser(list(DEFAULT_ANATOMIES))
    assert len(ct_rate.reports) == 800 and not ct_rate.problems
    for report in ct_rate.reports.values():
        found = parser(report.text)
        assert found, "a report produced no anatomy text"
        assert all(s.strip() for sentences in found.values() for s in sentences)


def test_findings_go_to_their_anatomy(ct_rate):
    parser = RuleParser(list(DEFAULT_ANATOMIES))
    parsed = {sid: parser(r.text) for sid, r in ct_rate.reports.items()}
    for label, (anatomy, word) in ROUTING.items():
        positives = [sid for sid, r in ct_rate.reports.items() if r.labels.get(label) == 1]
        assert len(positives) >= 50, label
        routed = sum(any(re.search(word, s, re.I) for s in parsed[sid].get(anatomy, [])) for sid in positives)
        assert routed / len(positives) >= 0.85, (label, routed, len(positives))
    # every sentence naming emphysema is a lung sentence, whatever else it names
    for sid, r in ct_rate.reports.items():
        for s in split_sentences(r.text):
            if re.search(r"emphysem", s, re.I):
                assert s in parsed[sid]["lung"]


def test_negation_stays_with_its_sentence_and_words_do_not_leak():
    parser = RuleParser(list(DEFAULT_ANATOMIES))
    out = parser(
        "No pleural effusion. The gallbladder is distended; Pericardial effusion was not observed. A 3.5 mm nodule."
    )
    assert out["lung"] == ["No pleural effusion.", "A 3.5 mm nodule."]
    assert out["gallbladder"] == ["The gallbladder is distended"]
    assert "bladder" not in out
    assert out["heart"] == ["Pericardial effusion was not observed."]
    assert "Pericardial effusion was not observed." not in out["lung"]


def test_table_rows_are_judged_one_by_one():
    csv_bytes = (
        b"scan_id,report,Nodule\n"
        b"a,Lungs are clear.,0\n"
        b"b,,1\n"
        b"c,Caf\xe9 \xff broken bytes.,0\n"
        b",orphan report,1\n"
        b"a,second report,1\n"
    )
    table = parse_report_table(csv_bytes, "r.csv", "scan_id", ["report"])
    assert table.reports["a"].text == "Lungs are clear." and table.reports["a"].labels == {"Nodule": 0}
    assert table.reports["b"].problem == "report is empty"
    assert table.reports["c"].problem == "report is not valid UTF-8"
    assert [w for w, _ in table.problems] == ["r.csv:5", "r.csv:6"]
    jsonl = b'{"scan_id": "x", "report": "Heart normal."}\nnot json\n{"scan_id": "y", "report": null}\n'
    table = parse_report_table(jsonl, "r.jsonl", "scan_id", ["report"])
    assert table.reports["x"].text == "Heart normal."
    assert table.reports["y"].problem == "report is missing"
    assert table.problems[0][0] == "r.jsonl:2"
    with pytest.raises(ValueError, match="no column named 'scan_id', 'report' in its first row of 2 fields"):
        parse_report_table(b"id,text\n1,x\n", "t.csv", "scan_id", ["report"])


def test_headerless_csv_error_quotes_no_cell():
    """Without a header row the 'column names' are the first report: the error counts them only."""
    canary = "CANARY-7f3e Doe^Jane"
    raw = f'CT0001,"{canary} has a 6 mm nodule.",1\n'.encode()
    with pytest.raises(ValueError) as err:
        parse_report_table(raw, "reports.csv", "scan_id", ["report"])
    assert "CANARY" not in str(err.value) and "Doe" not in str(err.value) and "3 fields" in str(err.value)


def test_gzip_tables_several_text_columns_and_a_labels_table():
    """CT-RATE's layout: Findings and Impressions in two columns, labels in another table, ids
    that are file names, and gzip-compressed JSONL."""
    rows = [
        {"VolumeName": "train_1_a_1.nii.gz", "Findings_EN": "The heart is enlarged", "Impressions_EN": "Cardiomegaly."},
        {"VolumeName": "train_2_a_1.nii.gz", "Findings_EN": "Lungs are clear.", "Impressions_EN": None},
        {"VolumeName": "train_3_a_1.nii.gz", "Findings_EN": "", "Impressions_EN": "  "},
    ]
    raw = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    table = parse_report_table(raw, "reports.jsonl.gz", "VolumeName", ["Findings_EN", "Impressions_EN"])
    assert (
        table.reports["train_1_a_1"].text == "The heart is enlarged. Cardiomegaly."
    )  # joined in order, sentences kept apart
    assert table.reports["train_2_a_1"].text == "Lungs are clear."
    assert table.reports["train_3_a_1"].problem == "report is empty"
    assert RuleParser(["heart"])(table.reports["train_1_a_1"].text) == {
        "heart": ["The heart is enlarged.", "Cardiomegaly."]
    }
    labels, problems = parse_label_table(
        b"VolumeName,Cardiomegaly,Lung nodule,note\ntrain_1_a_1.nii.gz,1,0,x\n,1,1,y\n", "labels.csv", "VolumeName"
    )
    assert labels == {"train_1_a_1": {"Cardiomegaly": 1, "Lung nodule": 0}} and problems == [
        ("labels.csv:3", "row has no usable 'VolumeName'")
    ]
