"""Provenance: git state, versions and hardware are recorded as plain JSON data."""

import json
import subprocess

from wn_rl.provenance import git_info, provenance


def test_provenance_is_json_and_names_commit_and_versions():
    info = provenance()
    json.dumps(info)  # plain data only
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert info["git"]["commit"] == head
    assert isinstance(info["git"]["dirty"], bool)
    for lib in ("torch", "numpy", "gymnasium", "ale-py"):
        assert info["versions"][lib], lib
    assert info["hardware"]["cpu_count"] >= 1
    assert info["hardware"]["memory_bytes"] > 0


def test_git_info_outside_a_checkout_is_none(tmp_path):
    info = git_info(tmp_path)
    assert info["commit"] is None and info["dirty"] is None
