"""Priors from the PACS (issue 20): source.py asks the PACS (C-FIND and C-GET/C-MOVE, or
QIDO-RS and WADO-RS), inbox.py takes a C-MOVE's instances from pxsgate's SCP, finder.py
picks and embeds each prior's AP image and keeps it (store/priors.py)."""
