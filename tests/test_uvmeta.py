"""Metadata read from the sample data sets, against independent values."""

import pytest

import uvmeta
from conftest import MIRIAD, UVH5, need_data
from reference import miriad_reference, uvh5_reference


@pytest.mark.parametrize("path,reference", [(MIRIAD, miriad_reference), (UVH5, uvh5_reference)],
                         ids=["miriad", "uvh5"])
def test_metadata_of_sample_data_matches_independent_reading(path, reference):
    need_data()
    got = uvmeta.read_observation(path)
    want = reference(path)
    assert got["obsid"] == want["obsid"]
    assert got["start_time_jd"] == pytest.approx(want["start_time_jd"], abs=1e-8)
    assert got["stop_time_jd"] == pytest.approx(want["stop_time_jd"], abs=1e-8)
    assert got["start_lst_hr"] == pytest.approx(want["start_lst_hr"], abs=1e-9)


def test_known_obsids_of_the_samples():
    need_data()
    # The MIRIAD obsid is the correlator's; the UVH5 one is floor(GPS) of
    # JD 2458432.3456945866 (2018-11-09 ~20:17:48 UTC, GPS-UTC = 18 s).
    assert uvmeta.read_observation(MIRIAD)["obsid"] == 1192201262
    assert uvmeta.read_observation(UVH5)["obsid"] == 1225829886


def test_other_files_have_no_metadata_and_broken_uvh5_is_an_error(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    assert uvmeta.read_observation(str(plain)) is None
    broken = tmp_path / "zen.1.2.uvh5"
    broken.write_bytes(b"not hdf5 at all")
    with pytest.raises(uvmeta.MetadataError, match="cannot read UVH5 header"):
        uvmeta.read_observation(str(broken))


def test_file_type_is_text_after_last_dot():
    assert uvmeta.file_type("zen.2458043.12552.xx.HH.uvA") == "uvA"
    assert uvmeta.file_type("zen.2458432.34569.uvh5") == "uvh5"
    assert uvmeta.file_type("README") == ""
