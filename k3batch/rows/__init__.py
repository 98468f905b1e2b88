"""Input rows: normalisation and validation (`check.normalise_row`), one module per concern
selected by the job's declared `capabilities.RowCapabilities`, and the ids, seeds, record
hashes and file keys of rows and their images. Plain Python: no Ray, no torch.

A bad row is never dropped and never raises: it comes back with `status="error"` and an
`error` naming each bad field and its value.
"""
