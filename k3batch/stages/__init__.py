"""Pipeline stages: small classes that know nothing about Ray.

Each stage loads what it needs once (in its constructor), declares the columns it `needs`
and `adds`, and maps a plain dict batch (column -> list of values) to the columns it adds.
`k3batch.dataflow` maps stages onto Ray Data.
"""
