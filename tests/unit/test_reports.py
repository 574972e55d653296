"""The rule parser on 800 real CT-RATE reports, and the reports table's per-row checks."""

import csv
import gzip
import json
import re

import pytest

from ctray.anatomy import DEFAULT_ANATOMIES
from ctray.ingest.reports import (
    RuleParser,
    finding_sentences,
    parse_label_table,
    parse_report_table,
    split_sentences,
)

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


def test_a_report_over_max_chars_is_refused_for_its_own_scan():
    """csv's default field limit (131,072 characters) used to fail the whole table on one long
    report; now that report alone is refused, with its length, and the rows after it are read."""
    long = "Lungs are clear. " * 12_000 + "End."
    before = csv.field_size_limit()
    raw = f'scan_id,report,Nodule\na,Heart normal.,0\nbig,"{long}",1\nc,No effusion.,0\n'.encode()
    table = parse_report_table(raw, "r.csv", "scan_id", ["report"], max_chars=100_000)
    assert csv.field_size_limit() == before  # the process-global limit is put back
    assert not table.problems and table.reports["a"].text == "Heart normal." and table.reports["c"].text
    big = table.reports["big"]
    assert big.text is None and big.labels == {"Nodule": 1}
    assert big.problem == "report is 204,004 characters, over the 100,000 limit (reports.max_chars)"
    # within the limit, a report longer than csv's default is read whole
    assert parse_report_table(raw, "r.csv", "scan_id", ["report"], max_chars=300_000).reports["big"].text == long
    # the limit applies to the text columns joined, and to JSONL alike
    rows = [{"scan_id": "x", "findings": "a" * 60, "impression": "b" * 60}, {"scan_id": "y", "findings": "ok"}]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    table = parse_report_table(jsonl, "r.jsonl", "scan_id", ["findings", "impression"], max_chars=100)
    assert table.reports["x"].problem == "report is 123 characters, over the 100 limit (reports.max_chars)"
    assert table.reports["y"].text == "ok."


def test_jsonl_lines_end_at_newline_only():
    """U+2028, U+2029 and U+0085 are valid unescaped inside a JSON string; str.splitlines cut the
    line there and lost the report. Lines end at "\\n" (with or without "\\r")."""
    text = "The lungs are clear.\u2028No pleural effusion.\u0085The heart is normal.\u2029End."
    rows = [{"scan_id": "a", "report": text}, {"scan_id": "b", "report": "Liver normal."}]
    raw = ("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\nnot json\n").encode()
    table = parse_report_table(raw, "r.jsonl", "scan_id", ["report"])
    assert table.reports["a"].text == text and table.reports["b"].text == "Liver normal."
    assert table.problems == [("r.jsonl:3", "line is not JSON (Expecting value)")]
    assert RuleParser(["lung", "heart"])(text) == {
        "lung": ["The lungs are clear.", "No pleural effusion."],
        "heart": ["The heart is normal."],
    }


# Canaries: a name, record number, birth date, physician and clinical details that must never reach
# an anatomy's text. The clinical history and technique name the lung on purpose.
CANARIES = ("Quillon", "Canaryfield", "88231907", "1957", "Hestia", "Canarywood", "CANARY")
US_HEADER = (
    "Patient Name: Quillon Canaryfield\n"
    "MRN: 88231907\n"
    "DOB: 03/14/1957\n"
    "Referring Physician: Dr. Hestia Canarywood\n"
    "Exam: CT CHEST WITH CONTRAST, 02/01/2024 10:42\n"
    "Clinical History: 66-year-old with a right lung nodule and cough\n"
    "(CANARY-HX), follow-up.\n"
    "Indication: Lung nodule follow-up, CANARY-IND\n"
    "Technique: Axial images of the chest after 80 mL iodinated contrast; lung and\n"
    "mediastinal windows. CANARY-TECH\n"
    "Comparison: CT chest 01/05/2023 (CANARY-CMP).\n"
)


def _no_canary(found: dict[str, list[str]]) -> None:
    for anatomy, sentences in found.items():
        for sentence in sentences:
            assert not any(c in sentence for c in CANARIES), (anatomy, sentence)


def test_us_report_header_stays_out_of_the_anatomy_texts():
    """A typical US report: header block, then FINDINGS with organ fields, IMPRESSION, a signature."""
    report = (
        "CT CHEST WITH CONTRAST\n\n" + US_HEADER + "\nFINDINGS:\n"
        "Lungs and airways: 6 mm nodule in the right upper lobe, unchanged. No consolidation.\n"
        "Pleura: No pleural effusion.\n"
        "Heart and pericardium: Normal heart size\n"
        "Upper abdomen: The liver is unremarkable.\n\n"
        "IMPRESSION:\n"
        "Stable 6 mm right upper lobe nodule.\n\n"
        "Electronically signed by: Dr. Hestia Canarywood, MD, lung imaging, on 02/01/2024 11:02\n"
    )
    found = RuleParser(list(DEFAULT_ANATOMIES))(report)
    _no_canary(found)
    assert found == {
        "lung": [
            "Lungs and airways: 6 mm nodule in the right upper lobe, unchanged.",
            "No consolidation.",
            "Pleura: No pleural effusion.",
            "Stable 6 mm right upper lobe nodule.",
        ],
        "heart": ["Heart and pericardium: Normal heart size"],  # a field line ends its sentence
        "liver": ["Upper abdomen: The liver is unremarkable."],
    }


def test_one_paragraph_report_loses_its_inline_header():
    """The whole report one paragraph: nothing but FINDINGS: ends the header's last value, which
    used to run into the first finding sentence."""
    report = (
        "Patient: Quillon Canaryfield MRN: 88231907 DOB: 03/14/1957 Referring: Dr Hestia Canarywood "
        "FINDINGS: The lungs are clear. No pleural effusion. The heart is normal in size. "
        "IMPRESSION: Normal CT of the chest."
    )
    found = RuleParser(list(DEFAULT_ANATOMIES))(report)
    _no_canary(found)
    assert found == {
        "lung": ["The lungs are clear.", "No pleural effusion."],
        "heart": ["The heart is normal in size."],
    }


@pytest.mark.parametrize(
    "report",
    [
        US_HEADER + "IMPRESSION: No pleural effusion.",  # no FINDINGS: a header block before IMPRESSION
        "Patient: Quillon Canaryfield\nMRN: 88231907\nNo pleural effusion.",  # no heading at all
        "No pleural effusion.\nDictated by: Hestia Canarywood lung service\nCANARY-TECH",
        "No pleural effusion. Referring physician: Dr Hestia Canarywood, lung clinic.",
    ],
)
def test_header_fields_stay_out_without_a_findings_heading(report):
    found = RuleParser(list(DEFAULT_ANATOMIES))(report)
    _no_canary(found)
    assert found == {"lung": ["No pleural effusion."]}


def test_text_before_a_conclusion_that_is_no_header_stays():
    """CT-RATE writes findings, then CONCLUSION: (train_615): only a header block before the first
    heading is dropped, and fields of organs or of wording ("As far as can be observed:") stay."""
    report = (
        "As far as can be observed: The heart is normal. Lungs: no nodule.\n"
        "CONCLUSION: Normal thoracic CT. Note: CT may be negative early in pneumonia."
    )
    assert RuleParser(["lung", "heart"])(report) == {
        "heart": ["As far as can be observed: The heart is normal."],
        "lung": ["Lungs: no nodule.", "Note: CT may be negative early in pneumonia."],
    }


def test_real_reports_without_headers_keep_their_sentences(ct_rate):
    """CT-RATE's reports have no header: every sentence reaches the anatomies as before, but for a
    leading "Comparison: <prior exam>." (train_40) and the heading word of "CONCLUSION:" (train_615)."""
    changed = {}
    for sid, report in ct_rate.reports.items():
        old, new = split_sentences(report.text), finding_sentences(report.text)
        if new != old:
            changed[sid] = ([s for s in old if s not in new], [s for s in new if s not in old])
    assert changed == {
        "train_40": (["Comparison: CT angiography examination dated 25.12.2019."], []),
        "train_615": (
            ["CONCLUSION: Thoracic CT examination within normal limits."],
            ["Thoracic CT examination within normal limits."],
        ),
    }


def test_ct_rate_reports_with_a_header_give_the_anatomy_texts_of_the_bare_report(ct_rate):
    """Each real report split into CT-RATE's Findings and Impressions fields (the published CSV
    joins them with a quote) and wrapped in a header: as lines above "Findings:"/"Impressions:", as
    one paragraph of inline fields, and in capitals as a US report. Every layout gives exactly the
    anatomy texts of the bare Findings and Impressions; no canary reaches any of them."""
    parser = RuleParser(list(DEFAULT_ANATOMIES))
    inline = US_HEADER.replace("\n", " ")
    for sid, report in ct_rate.reports.items():
        findings, _, impressions = report.text.partition('"')
        findings, impressions = findings.strip(), impressions.replace('"', " ").strip()
        a, b = parser(findings), parser(impressions)
        bare = {k: a.get(k, []) + b.get(k, []) for k in {*a, *b}}
        for wrapped in (
            f"{US_HEADER}\nFindings:\n{findings}\n\nImpressions:\n{impressions}\n",
            f"{inline} Findings: {findings} Impressions: {impressions}",
            f"{US_HEADER}FINDINGS: {findings}\nIMPRESSION: {impressions}",
        ):
            found = parser(wrapped)
            _no_canary(found)
            assert found == bare, sid
    lung = parser(f"{inline} Findings: {ct_rate.reports['train_1'].text}")["lung"]
    assert "Pleural effusion-thickening was not detected." in lung
