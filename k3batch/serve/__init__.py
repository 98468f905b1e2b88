"""Online serving on Ray Serve: an OpenAI Images API compatible endpoint.

`k3batch.serve.app:build_app` is the application builder that `serve run` / `serve deploy`
configs point at; `k3batch serve CONFIG` runs the same config.
"""
