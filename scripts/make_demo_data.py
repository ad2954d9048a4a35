"""Build the demo study shipped in ``demo/study/`` from redistributable real data.

* Four radiographs of one real UNIFESP CR study (MIT, PNG/JPEG conversions of real
  CR DICOMs; in ``../shared/data/msk``): two forearm and two hand/wrist views, from
  the validation split (never seen by the models in training), wrapped back into
  Computed Radiography DICOM (8-bit MONOCHROME2).
* The pydicom test data CRs of a distal tibia (RG3_J2KI; JPEG 2000, MONOCHROME1) and
  of a hip (RG2_JPLY; JPEG extended 12-bit), MIT, out-of-scope body parts that show
  the "not analysed" / "needs review" paths, re-filed into the same study.

Patient attributes are fictitious.  Run once; the output is committed.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
DICOM = ROOT.parent / "shared" / "data" / "dicom"
OUT = ROOT / "demo" / "study"
STUDY = "1.2.826.0.1.3680043.8.498.84743333129827793527360010130911646452"
PATIENT = {"PatientName": "DEMO^Forearm", "PatientID": "DEMO-0001",
           "PatientBirthDate": "19800101", "PatientSex": "F"}
CR = "1.2.840.10008.5.1.4.1.1.1"


def wrap(jpeg: Path, body_part: str, series: int, number: int, study_uid: str = STUDY,
         patient: dict[str, str] | None = None) -> Dataset:
    """A grayscale JPEG radiograph as a Computed Radiography instance of ``study_uid``."""
    STUDY = study_uid  # noqa: N806 - the study this instance is filed into
    pixels = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    sop_uid = generate_uid(entropy_srcs=[jpeg.name, study_uid, "demo"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[STUDY, body_part, "demo"])
    ds.Modality = "CR"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240315"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "DEMO0001"
    ds.StudyID = "1"
    ds.StudyDescription = "XR FOREARM AND WRIST"
    ds.SeriesDescription = f"{body_part.title()} views"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    ds.BodyPartExamined = "ARM" if body_part == "FOREARM" else body_part  # PS3.16 L: no FOREARM term
    ds.ImageLaterality = "U"
    ds.ViewPosition = ""
    ds.PatientOrientation = ""
    ds.Manufacturer = "UNIFESP (converted)"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for key, value in (patient or PATIENT).items():
        setattr(ds, key, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def refile(source: Path, series: int, target: Path) -> None:
    """Save a real DICOM file as ``target``, filed into the demo study as series
    ``series`` with the demo patient; its own UIDs and pixels are kept."""
    ds = pydicom.dcmread(source)
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = STUDY
    ds.AccessionNumber = "DEMO0001"
    ds.SeriesNumber = series
    ds.save_as(target)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {r["path"].rsplit("/", 1)[-1].split("-c.jpg")[0]: r
            for r in csv.DictReader((MSK / "manifest.csv").open())
            if r["dataset"] == "UNIFESP-bodypart" and r["study_id"] == STUDY}
    series_of = {"FOREARM": 1, "HAND": 2}
    taken = {"FOREARM": 0, "HAND": 0}
    for key, row in sorted(rows.items()):
        if row["split"] != "val":
            continue
        part = "FOREARM" if row["body_part"] == "FOREARM" else "HAND"
        if taken[part] == 2:
            continue
        taken[part] += 1
        number = sum(taken.values())
        ds = wrap(MSK / row["path"], part, series_of[part], number)
        ds.save_as(OUT / f"{part.lower()}_{taken[part]}.dcm", enforce_file_format=True)
    refile(DICOM / "pydicom-data" / "RG3_J2KI.dcm", 3, OUT / "tibia_rg3_j2k.dcm")
    refile(DICOM / "pylibjpeg-data" / "RG2_JPLY_fixed.dcm", 4, OUT / "hip_rg2_jpeg.dcm")
    print(f"wrote {len(list(OUT.glob('*.dcm')))} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
