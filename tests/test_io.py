"""io.write_csv: plain and gzip-compressed tables, byte-for-byte repeatable."""

import pandas as pd
from adaptive_sae import io
from adaptive_sae.results import ResultsDir


def test_compressed_tables_round_trip_and_repeat(tmp_path):
    df = pd.DataFrame({"token": range(1000), "l0": [i % 7 for i in range(1000)]})
    out = ResultsDir("exp", "run", root=tmp_path)
    path = out.save_table("per_token", df, compress=True)
    assert path.name == "per_token.csv.gz" and path.read_bytes()[:2] == b"\x1f\x8b"
    first = path.read_bytes()
    out.save_table("per_token", df, compress=True)
    assert path.read_bytes() == first  # no timestamp in the gzip header
    pd.testing.assert_frame_equal(pd.read_csv(path), df)
    plain = io.write_csv(tmp_path / "plain.csv", df)
    assert plain.stat().st_size > len(first)
