"""The installed `ctray` command as a process of its own: a bad config is one line on stderr and
exit status 2, and a command that writes files (`ctray phantoms`) runs to its end. The command's
parser and its in-process errors: unit/test_cli.py."""

import os

from helpers import ctray_cli


def test_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {scans: x}\noutput: {uri: y}\npreprocess: {spacingg: [1, 1, 1]}\n")
    done = ctray_cli("ingest", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "preprocess.spacingg" in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text(f"input: {{scans: {tmp_path}/none}}\noutput: {{uri: {tmp_path}/out}}\n")
    done = ctray_cli("ingest", str(good))
    assert done.returncode == 2 and "does not exist" in done.stderr.splitlines()[-1]


def test_phantoms_command_writes_a_dataset(tmp_path):
    ctray_cli("phantoms", str(tmp_path / "p"), "--n", "2", "--shape", "16", "32", "32", "--dicom", "1", check=True)
    assert sorted(os.listdir(tmp_path / "p" / "scans")) == ["phantom0000", "phantom0001.nii.gz"]
    assert len((tmp_path / "p" / "reports.jsonl").read_text().splitlines()) == 2
