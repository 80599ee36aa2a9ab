"""Reading a YAML file and checking it against the config's JSON Schema (noisynn/pipeline/schema.py)."""

from __future__ import annotations

import pytest

from noisynn.errors import UserError
from noisynn.pipeline.config import load_config


def test_missing_or_unparsable_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
