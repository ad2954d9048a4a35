"""fracture-node: dicom_out - the result objects returned into the study.

* :func:`dicom_out.sc.build_secondary_capture` - Grad-CAM heat map Secondary
  Capture per analysed image (PS3.3 A.8.1);
* :func:`dicom_out.sr.build_structured_report` - TID 1500 Measurement Report in a
  Comprehensive 3D SR per study (PS3.3 A.35.13, PS3.16 TID 1500);
* :func:`dicom_out.pdf.build_pdf_report` - Encapsulated PDF report per study
  (PS3.3 A.45.1);
* :func:`dicom_out.ko.build_key_object_selection` - optional Key Object Selection
  of the positive images (PS3.3 A.35.4);
* :mod:`dicom_out.common` - :class:`~dicom_out.common.OutputSettings`,
  :func:`~dicom_out.common.output_uid` and the shared heat-map rendering.

Builders return :class:`pydicom.Dataset` objects; they never open a socket and never
run a model.  They import only the result types of :mod:`pipeline.result`.
"""
