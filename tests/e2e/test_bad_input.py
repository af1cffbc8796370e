"""Bad input ends as a failed or skipped job with an actionable message; the node keeps running
and nothing already stored is lost or duplicated. All through the real Orthanc + storescu."""

from __future__ import annotations

from pathlib import Path

import pydicom

from tooling.convert import StudyInfo, volume_to_ct_series, write_series


def send(node, datasets: list[pydicom.Dataset], directory: Path) -> str:
    """Write and storescu the datasets; return their StudyInstanceUID."""
    write_series(datasets, directory)
    sent = node.storescu(directory)
    assert sent.returncode == 0, sent.stderr
    return datasets[0].StudyInstanceUID


def instance_count(node) -> int:
    return int(node.get("/statistics")["CountInstances"])


def test_non_ct_study_is_skipped_with_reason(node, tmp_path, ct_crop):
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="bad-mr", info=StudyInfo(patient_id="BAD-MR"))
    for ds in datasets:
        ds.Modality = "MR"
    job = node.wait_for_job(send(node, datasets, tmp_path))
    assert job["state"] == "skipped"
    assert "modality MR is not in SeriesRules.Modalities" in job["error"]


def test_single_slice_series_is_skipped(node, tmp_path, ct_crop):
    datasets = volume_to_ct_series(ct_crop(1), (2.5, 1.0, 1.0), uid_seed="bad-single")
    job = node.wait_for_job(send(node, datasets, tmp_path))
    assert job["state"] == "skipped"
    assert "1 instance(s), fewer than SeriesRules.MinSlices=10" in job["error"]


def test_missing_pixel_spacing_fails_naming_the_tag(node, tmp_path, ct_crop):
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="bad-spacing")
    del datasets[5].PixelSpacing
    job = node.wait_for_job(send(node, datasets, tmp_path))
    assert job["state"] == "failed"
    assert "PixelSpacing (0028,0030)" in job["error"] and datasets[5].SOPInstanceUID in job["error"]


def test_mixed_series_fails(node, tmp_path, ct_crop):
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="bad-mixed")
    odd = volume_to_ct_series(ct_crop(3, size=32), (2.5, 1.0, 1.0), uid_seed="bad-mixed-odd",
                              study_uid=datasets[0].StudyInstanceUID)
    for ds in odd:
        ds.SeriesInstanceUID = datasets[0].SeriesInstanceUID
        ds.FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    job = node.wait_for_job(send(node, datasets + odd, tmp_path))
    assert job["state"] == "failed"
    assert "mixes several values of Rows" in job["error"]


def jpeg2000_series(source: Path, tag: str) -> list[pydicom.Dataset]:
    """The real JPEG 2000 lossless CT series of totalsegmentator (Siemens Biograph headers).

    That sample was anonymised by blanking SOPClassUID/SOPInstanceUID/Study/SeriesInstanceUID,
    which no PACS would send; we fill them in as an anonymising gateway would.
    """
    datasets = []
    for index, path in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[tag, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[tag, "study"])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[tag, "series"])
        ds.PatientID = tag.upper()
        datasets.append(ds)
    return datasets


def save_all(datasets: list[pydicom.Dataset], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ds.save_as(directory / f"{index:03d}.dcm", enforce_file_format=True)
    return directory


def test_jpeg2000_lossless_series_is_decoded_and_segmented(node, tmp_path, sample):
    datasets = jpeg2000_series(sample("jpeg2000_ct"), "j2k-good")
    sent = node.storescu(save_all(datasets, tmp_path / "j2k"), propose="-xv")
    assert sent.returncode == 0, sent.stderr
    job = node.wait_for_job(datasets[0].StudyInstanceUID)
    assert job["state"] == "done", job
    assert job["result"]["frames"] == len(datasets)


def test_undecodable_pixel_data_fails_naming_the_instance(node, tmp_path, sample):
    """A valid DICOM file whose JPEG 2000 codestream is cut short (Orthanc stores it; decoding fails)."""
    before = instance_count(node)
    datasets = jpeg2000_series(sample("jpeg2000_ct"), "j2k-broken")
    broken = datasets[7]
    codestream = next(iter(pydicom.encaps.generate_frames(broken.PixelData, number_of_frames=1)))
    broken.PixelData = pydicom.encaps.encapsulate([codestream[: len(codestream) // 8]])
    sent = node.storescu(save_all(datasets, tmp_path / "j2k"), propose="-xv")
    assert sent.returncode == 0, sent.stderr
    job = node.wait_for_job(datasets[0].StudyInstanceUID)
    assert job["state"] == "failed"
    assert broken.SOPInstanceUID in job["error"] and "cannot be decoded" in job["error"]
    assert instance_count(node) == before + len(datasets)  # nothing lost, nothing added


def test_garbage_upload_is_refused_and_node_keeps_working(node, tmp_path, ct_crop):
    before = instance_count(node)
    answer = node.http.post(node.url + "/instances", data=b"this is not DICOM" * 100, timeout=30)
    assert answer.status_code == 400
    datasets = volume_to_ct_series(ct_crop(12), (2.5, 1.0, 1.0), uid_seed="after-garbage")
    job = node.wait_for_job(send(node, datasets, tmp_path))
    assert job["state"] == "done"
    assert instance_count(node) == before + len(datasets) + 3  # the CT, our SEG and our two SRs


def test_real_scanner_series_rider_lung(node, tmp_path, sample):
    """236 real 512x512 slices with real scanner headers (TCIA RIDER)."""
    source = sample("rider_lung_ct")
    files = sorted(p for p in source.iterdir() if p.suffix == ".dcm" or p.name[0].isdigit())
    files = [p for p in files if p.is_file() and p.name != "LICENSE"]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sent = node.storescu(files)
    assert sent.returncode == 0, sent.stderr
    job = node.wait_for_job(first.StudyInstanceUID, timeout=600)
    assert job["state"] == "done", job
    assert job["result"]["frames"] == len(files)


def test_study_of_2000_slices_is_processed_in_chunks(start_node, tiny_weights_path, tmp_path, ct_crop):
    """2,000 slices (real CT rows, small matrix and a tiny network to keep CI short): decoded and
    segmented chunk by chunk, the worker's memory bounded."""
    node = start_node("long-series", {"WeightsPath": str(tiny_weights_path), "ChunkSlices": 32})
    block = ct_crop(2000, size=32)
    datasets = volume_to_ct_series(block, (0.5, 1.0, 1.0), uid_seed="long-2000", info=StudyInfo(patient_id="LONG-2000"))
    job = node.wait_for_job(send(node, datasets, tmp_path), timeout=900)
    assert job["state"] == "done", job
    assert job["result"]["frames"] == 2000
    assert job["result"]["peak_rss_mb"] < 2048  # of this job; decoded HU never all in memory
