"""Test-support code for breastcad: real peers (Orthanc, dcmtk), shared data, DICOM fixtures.

Import as ``from support.orthanc import OrthancServer``; ``tests/conftest.py`` puts the
``tests`` directory on ``sys.path``.
"""
