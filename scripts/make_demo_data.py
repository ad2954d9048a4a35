"""Build the demo studies shipped in ``demo/studies/`` from redistributable real data.

Four studies, as a department would send them (one patient, one date and consistent
series per study):

* ``forearm/``: a real UNIFESP CR study "XR FOREARM AND WRIST" (MIT; validation split,
  never seen by the models in training): two forearm views (one doubtful, one normal
  with the shipped models) and two hand/wrist views (not analysed: unsupported body
  part), plus a colour clinical photograph filed with the study (a synthetic RGB
  scene standing in for one; refused as a colour image).
* ``normal-forearm/``: a two-view UNIFESP forearm study that the node answers
  negative (its images were router training images; the classifier never saw them).
* ``tibia/``: the pydicom test CR of a distal tibia (RG3_J2KI; JPEG 2000, MONOCHROME1).
* ``hip/``: the pylibjpeg test CR of a hip (RG2_JPLY; JPEG extended 12-bit).

Patient attributes are fictitious.  Run once; the output is committed.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
MSK = ROOT.parent / "shared" / "data" / "msk"
DICOM = ROOT.parent / "shared" / "data" / "dicom"
OUT = ROOT / "demo" / "studies"
STUDY = "1.2.826.0.1.3680043.8.498.84743333129827793527360010130911646452"
NORMAL_STUDY = "1.2.826.0.1.3680043.8.498.51294928368582346805247828505834245411"
PATIENT = {"PatientName": "DEMO^Forearm", "PatientID": "DEMO-0001",
           "PatientBirthDate": "19800101", "PatientSex": "F"}
NORMAL_PATIENT = {"PatientName": "DEMO^Normal", "PatientID": "DEMO-0002",
                  "PatientBirthDate": "19920611", "PatientSex": "M"}
TIBIA_PATIENT = {"PatientName": "DEMO^Tibia", "PatientID": "DEMO-0003",
                 "PatientBirthDate": "20050203", "PatientSex": "M"}
HIP_PATIENT = {"PatientName": "DEMO^Hip", "PatientID": "DEMO-0004",
               "PatientBirthDate": "19480922", "PatientSex": "F"}
SC = "1.2.840.10008.5.1.4.1.1.7"
CR = "1.2.840.10008.5.1.4.1.1.1"


def wrap(jpeg: Path, body_part: str, series: int, number: int, study_uid: str = STUDY,
         patient: dict[str, str] | None = None, date: str = "20240315",
         description: str = "XR FOREARM AND WRIST", accession: str = "DEMO0001") -> Dataset:
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
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = description
    ds.SeriesDescription = "Forearm views" if body_part == "FOREARM" else "Hand and wrist views"
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


def refile(source: Path, target: Path, patient: dict[str, str], date: str,
           accession: str) -> None:
    """Save a real DICOM file as ``target``, as the only series of a study of its own
    (series 1, image 1) of ``patient`` on ``date``; its pixels are kept."""
    ds = pydicom.dcmread(source)
    for key, value in patient.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[source.name, "demo-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[source.name, "demo-series"])
    ds.AccessionNumber = accession
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, keyword, date)
    for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, keyword, "093000")
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)


def photograph(template: Dataset, path: Path) -> None:
    """A colour "clinical photograph" filed with the study as a Secondary Capture: a
    synthetic saturated RGB scene (skin tone, a red wound, a blue drape) standing in
    for a photo or screenshot pushed with a study.  The node refuses it as colour."""
    rows, cols = 240, 320
    img = np.zeros((rows, cols, 3), np.uint8)
    img[:] = (40, 90, 200)               # drape
    img[40:200, 60:260] = (224, 172, 140)  # skin
    img[100:140, 130:190] = (200, 30, 40)  # wound
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[template.StudyInstanceUID, "photo"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName"):
        setattr(ds, keyword, template.get(keyword, ""))
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[template.StudyInstanceUID, "photo-series"])
    ds.Modality = "OT"  # as a scanned or captured photo is commonly filed; routed like CR
    ds.ConversionType = "DI"
    ds.SeriesNumber = 50
    ds.SeriesDescription = "Clinical photograph"
    ds.InstanceNumber = 1
    ds.SeriesDate = ds.ContentDate = template.StudyDate
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)


def main() -> int:
    rows = [r for r in csv.DictReader((MSK / "manifest.csv").open())
            if r["dataset"] == "UNIFESP-bodypart"]
    forearm = OUT / "forearm"
    forearm.mkdir(parents=True, exist_ok=True)
    series_of = {"FOREARM": 1, "HAND": 2}
    taken = {"FOREARM": 0, "HAND": 0}
    first: Dataset | None = None
    for row in sorted((r for r in rows if r["study_id"] == STUDY and r["split"] == "val"),
                      key=lambda r: r["path"]):
        part = "FOREARM" if row["body_part"] == "FOREARM" else "HAND"
        if row["body_part"] not in ("FOREARM", "HAND", "HAND+WRIST", "WRIST") or taken[part] == 2:
            continue
        taken[part] += 1
        ds = wrap(MSK / row["path"], part, series_of[part], taken[part])
        first = first or ds
        ds.save_as(forearm / f"{part.lower()}_{taken[part]}.dcm", enforce_file_format=True)
    assert first is not None
    photograph(first, forearm / "photograph.dcm")
    normal = OUT / "normal-forearm"
    normal.mkdir(parents=True, exist_ok=True)
    picked = sorted((r for r in rows if r["study_id"] == NORMAL_STUDY
                     and r["body_part"] in ("FOREARM", "ELBOW+FOREARM")), key=lambda r: r["path"])
    for number, row in enumerate(picked, start=1):
        ds = wrap(MSK / row["path"], "FOREARM", 1, number, study_uid=NORMAL_STUDY,
                  patient=NORMAL_PATIENT, date="20240318", description="XR FOREARM 2 VIEWS",
                  accession="DEMO0002")
        ds.save_as(normal / f"forearm_{number}.dcm", enforce_file_format=True)
    refile(DICOM / "pydicom-data" / "RG3_J2KI.dcm", OUT / "tibia" / "tibia_rg3_j2k.dcm",
           TIBIA_PATIENT, "20240320", "DEMO0003")
    refile(DICOM / "pylibjpeg-data" / "RG2_JPLY_fixed.dcm", OUT / "hip" / "hip_rg2_jpeg.dcm",
           HIP_PATIENT, "20240322", "DEMO0004")
    print(f"wrote {len(list(OUT.rglob('*.dcm')))} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
