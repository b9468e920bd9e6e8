"""pxsgate: a DICOM gateway that scores chest radiographs with the PXS model.

The data flow, one module per stage (read them in this order):
receive -> spool -> assemble -> rules -> preprocess -> infer/pxs -> results -> store.
"""

__version__ = "0.1.0"
