"""The DICOM sender: C-STORE SCU of the durable delivery queue to PACS destinations.

``scu.py`` sends one batch over one association (pynetdicom), ``service.py`` runs one sender
thread per destination, ``rate.py`` is the optional per-destination rate limit. The queue
itself (what is due, back-off, outcomes) is core: ``xray_triage/store/deliveries.py``.
"""
