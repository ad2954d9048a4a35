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


def warm_up() -> None:
    """Load, once per process, what the first study's result objects would otherwise
    load while that study waits (about 0.5 s on the reference machine): the IOD tables
    highdicom's constructors consult (three JSON files) and the PDF report's fonts.
    The node calls it where it builds: in its own process and in each build process."""
    from highdicom import _standard_utils as standard

    from dicom_out.pdf import _styles

    standard.get_sop_class_iod_map()
    standard.get_iod_module_map()
    standard.get_module_attribute_map()
    _styles()
