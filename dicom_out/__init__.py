"""fracture-node: dicom_out."""
