"""What tests, benchmarks and the demo need beside the product: tiny random-weight models of
the real architectures (`tiny`, `tiny_parts`, `tiny_llm`) and fault injection
(`faults`). Nothing here is imported by a production path except to build a tiny model a
config asks for (`model.make_tiny`, `beautify.make_tiny`) and the runner's one override point."""
