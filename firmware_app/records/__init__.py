"""Patient records: captures (encrypted at rest), DICOM export, signed audit checkpoints, input drift.

- ``captures``: ``Recorder`` (pipeline listener, pre-trigger clip, capture / disagree / new patient),
  ``CaptureStore`` (the encrypted files under ``<data-dir>/captures``);
- ``export``: ``export_fileset`` (DICOM File-set with DICOMDIR: source image, burned-in AI overlay, SEG,
  TID 1500 SR) and ``export_feedback`` (disagree cases, de-identified, with JSON sidecars);
- ``checkpoints``: signed checkpoints of the audit log and their verification;
- ``drift``: ``DriftMonitor`` ("INPUT UNLIKE TRAINING DATA") and ``reference_stats`` for manifests;
- ``commands``: what the command line and the daemon call (``cmd_export``, ``verify_records`` ...).

Submodules are imported on use: the export pulls in highdicom, which the live pipeline does not need.
"""
