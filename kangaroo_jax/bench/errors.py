"""The benchmark's one error type (every module of the package raises it)."""


class BenchError(ValueError):
  """Bad benchmark input (questions file, category, method, flag); the message says which."""
